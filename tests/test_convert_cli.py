"""Assembling a VLM from parts (the VILA stage-1 starting point) and the convert CLI, end to end on tiny parts."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_fixtures as F  # noqa: E402

from vlmjax.convert.__main__ import main as convert_main  # noqa: E402


def tiny_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_assemble_then_verify_with_transformers(tmp_path, tower, capsys):
    F.make_causal_lm(tmp_path / "llm", "llama")
    tiny_tokenizer(F.V).save_pretrained(tmp_path / "llm")
    torch.manual_seed(0)
    # SigLIP as released: with its attention-pool head (transformers' default), which LLaVA does not use
    vis = transformers.AutoModel.from_config(F.vision_config(tower, head=tower == "siglip")).eval()
    F._randomize(vis)
    vis.save_pretrained(tmp_path / "vision")
    assert convert_main(["assemble", "--llm", str(tmp_path / "llm"), "--vision", str(tmp_path / "vision"),
                         "--out", str(tmp_path / "vlm")]) == 0
    cfg = json.loads((tmp_path / "vlm" / "config.json").read_text())
    # <image> was added after the 128-token vocab: the embedding grew to the next multiple of 64
    assert cfg["image_token_index"] == F.V and cfg["text_config"]["vocab_size"] == 192
    assert cfg["vision_feature_select_strategy"] == ("default" if tower == "clip" else "full")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "vlm")
    assert tok.convert_tokens_to_ids("<image>") == F.V
    capsys.readouterr()
    assert convert_main(["verify", str(tmp_path / "vlm"), "--atol", "1e-4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] <= 1e-4
    # the LLM weights survived assembly: text-only logits equal the source causal LM's on the old vocab
    from vlmjax.convert import hf

    vlm, _ = hf.load_vlm(tmp_path / "vlm")
    src = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llm").eval()
    ids = np.random.default_rng(0).integers(0, F.V, (1, 12))
    with torch.no_grad():
        ref = src(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(vlm(ids.astype(np.int32)))[..., : F.V] - ref).max() <= 1e-4


def test_help_names_the_command_and_every_flag():
    import subprocess
    import sys

    from vlmjax.convert.__main__ import build_parser

    out = subprocess.run([sys.executable, "-m", "vlmjax.convert", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m vlmjax.convert "), out.stderr
    parser = build_parser()
    subs = next(a for a in parser._actions if a.choices and "assemble" in a.choices).choices
    assert set(subs) == {"assemble", "gguf-to-hf", "verify", "to-hf", "average"}
    for name, sub in subs.items():
        assert sub.prog == f"python -m vlmjax.convert {name}" and sub.description
        for action in sub._actions:
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
        with pytest.raises(SystemExit) as e:
            convert_main([name, "--help"])
        assert e.value.code == 0


def test_import_and_export_show_progress_on_a_terminal(tmp_path, monkeypatch):
    import io
    import sys

    from vlmjax.convert import hf

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    F.make_causal_lm(tmp_path / "src", "llama")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    model, _ = hf.load_causal_lm(tmp_path / "src")
    hf.save_causal_lm(model, tmp_path / "out")
    text = term.getvalue()
    rules = 3 + 9  # embed, norm, lm_head + 9 per-layer params (stacked over layers)
    assert "load src: 100%" in text and f"{rules}/{rules}" in text, text
    assert "export out: 100%" in text, text
