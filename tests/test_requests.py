"""Generation / scoring inputs read what training reads: `requests_from_source` over the trainer's SourceSpecs and
parsers, bad records as named error records, unsafe image paths, compressed shards, and the CLIs' argument checks."""

import gzip
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlmjax.data.errors import BAD_RECORD, BadSample, BadSamplePolicy
from vlmjax.data.image import ImageSpec
from vlmjax.data.image_store import open_image_store, resolve_image
from vlmjax.data.pipeline import DataConfig, SourceSpec, make_iterator
from vlmjax.data.text import TextSpec
from vlmjax.generate.requests import Encoder, llava_requests, requests_from_source
from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig

TPI = 4  # tokens per image of the tiny config: (16 / 8) ** 2


@pytest.fixture(scope="module")
def tok():
    from vlmjax.data.assets import smollm2_tokenizer

    return smollm2_tokenizer()


def tiny_cfg():
    llm = LLMConfig(vocab_size=49216, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    vis = VisionConfig(kind="siglip", image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=1,
                       num_heads=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return VLMConfig(llm=llm, vision=vis, vision_feature_select="full", image_token_id=49152)


def png(i):
    buf = io.BytesIO()
    Image.fromarray(np.full((12 + i, 10, 3), 20 * i, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path, names):
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            data = png(i)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def dirty_llava(root):
    """A JSONL file with one good record and one of each failure that used to abort the whole run."""
    (root / "imgs").mkdir()
    (root / "imgs" / "0.png").write_bytes(png(0))
    turn = lambda who, text: {"from": who, "value": text}
    lines = [json.dumps({"id": "good", "image": "0.png", "conversations": [turn("human", "What?")]}).encode(),
             json.dumps({"id": "role", "conversations": [turn("robot", "Hi")]}).encode(),  # KeyError before
             json.dumps({"id": "nouser", "image": "0.png",  # StopIteration before
                         "conversations": [turn("gpt", "An answer.")]}).encode(),
             b'{"id": "torn", "conversations": [',  # JSONDecodeError before
             b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}',  # UnicodeDecodeError
             b'["not", "a", "record"]']
    (root / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "d.jsonl", root / "imgs"


def test_bad_records_become_named_errors_not_an_aborted_run(tmp_path, tok):
    path, imgs = dirty_llava(tmp_path)
    reqs = llava_requests(path, imgs)
    assert [r.id for r in reqs] == ["good", "role", "nouser", "#3", "#4", "#5"]
    assert reqs[0].error is None and reqs[0].prompt_messages() == [{"role": "user", "content": "<image>\nWhat?"}]
    errors = {r.id: str(r.error) for r in reqs[1:]}
    assert all(str(path) in e and f"sample {i!r}" in e for i, e in errors.items())  # names sample and file
    assert "[unknown_role]" in errors["role"] and "[image_count]" in errors["nouser"]
    assert "[bad_record]" in errors["#3"] and "not valid JSON" in errors["#3"] and "[bad_record]" in errors["#4"]
    assert "record is a list" in errors["#5"]
    with pytest.raises(BadSample) as e:  # encoding one raises its BadSample: the runners write it as the error
        Encoder(tok, tiny_cfg()).prompt(reqs[1])
    assert e.value.sample_id == "role" and e.value.source == str(path)
    with pytest.raises(BadSample, match=r"\[unknown_role\].*sample 'role' in .*d\.jsonl"):
        llava_requests(path, imgs, on_bad_sample="error")


def test_bad_records_and_missing_images_are_written_and_counted(tmp_path, tok, monkeypatch, capsys):
    """The CLI end to end: error records naming sample and file, counted in its summary; nothing aborts."""
    from test_generate import smol_vlm

    from vlmjax.generate import __main__ as cli_main
    from vlmjax.generate import loading
    from vlmjax.generate.jsonl import read_jsonl

    path, imgs = dirty_llava(tmp_path)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "gone", "image": "gone.png", "conversations": [{"from": "human", "value": "Q"}]})
                + "\n")
    model = smol_vlm()
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: (model, model.cfg, tok))
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(tmp_path), "--data", str(path), "--image-folder", str(imgs), "--out", str(out),
            "--max-new-tokens", "2", "--batch-size", "4"]
    assert cli_main.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_jsonl(out)
    assert summary["errors"] == 6 and summary["written"] + summary["failed"] == 7 and len(rows) == 7
    assert "output" in rows["good"] and "error" not in rows["good"]
    assert "image file not found" in rows["gone"]["error"] and str(path) in rows["gone"]["error"]
    assert "sample 'gone'" in rows["gone"]["error"]
    assert cli_main.main(argv) == 0  # rerun: nothing retried
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["written"] == 0 and rerun["failed"] == 0
    # --on-bad-sample error: stops at the first bad record, naming it, before the model loads
    with pytest.raises(SystemExit) as e:
        cli_main.main(argv + ["--on-bad-sample", "error"])
    assert e.value.code == 2 and "sample 'role'" in capsys.readouterr().err
    # ...and at the first image that cannot be read, with rc 1 and one line
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes(b"".join(line for line in path.read_bytes().splitlines(keepends=True) if b'"gone"' in line))
    argv = ["--model", str(tmp_path), "--data", str(clean), "--image-folder", str(imgs), "--on-bad-sample", "error",
            "--out", str(tmp_path / "strict.jsonl")]
    assert cli_main.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m vlmjax.generate: error: [missing_image]") and "sample 'gone'" in err


def test_json_list_with_bad_json_names_the_file_under_both_policies(tmp_path, tok):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"id": "a", "conversations": []}, {"id": ')
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'[{"id": "a", "caption": "caf\xe9"}]')
    for path in (bad, latin):
        for policy in ("skip", "error"):
            with pytest.raises(ValueError, match=f"{path}.* is not a valid JSON file"):
                requests_from_source(SourceSpec(path=str(path)), on_bad_sample=policy)
            cfg = DataConfig(sources=(SourceSpec(path=str(path)),), batch_size=1, seq_len=64, max_images=1,
                             image=ImageSpec(image_size=16, tokens_per_image=TPI), shard_index=0, shard_count=1,
                             bad_samples=BadSamplePolicy(policy))
            with pytest.raises(ValueError, match=f"{path}.* is not a valid JSON file"):
                make_iterator(cfg, tok)


def test_image_paths_outside_the_root_are_bad_samples(tmp_path, tok):
    (tmp_path / "secret.png").write_bytes(png(1))  # readable, but outside the image root
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "root" / "ok.png").write_bytes(png(0))
    store = open_image_store(tmp_path / "root")
    assert resolve_image("sub/../ok.png", store) == os.path.join(str(tmp_path / "root"), "ok.png")
    for name in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png")):
        with pytest.raises(BadSample) as e:
            resolve_image(name, store)
        assert e.value.reason == BAD_RECORD and "outside the image root" in str(e.value) and name in str(e.value)
    # through a request: an error naming the sample and the file
    recs = [{"id": "escape", "image": "../secret.png", "conversations": [{"from": "human", "value": "Q"}]}]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    req = llava_requests(tmp_path / "d.json", tmp_path / "root")[0]
    with pytest.raises(BadSample, match=r"outside the image root.*sample 'escape' in .*d\.json"):
        Encoder(tok, tiny_cfg()).prompt(req)
    # tar shards are looked up by member name in their own index: "../x" is a name, never a path on disk
    write_shard(tmp_path / "s.tar", ["../secret.png", "a.png"])
    tar = open_image_store(str(tmp_path / "s.tar"))
    assert resolve_image("../secret.png", tar) == png(0)
    with pytest.raises(BadSample, match="missing_image"):
        resolve_image("../../secret.png", tar)


def test_compressed_tar_shard_is_named(tmp_path):
    write_shard(tmp_path / "plain.tar", ["a.png"])
    (tmp_path / "shard-0.tar").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"id": "c", "image": "a.png", "caption": "A."}) + "\n")
    store = open_image_store(str(tmp_path / "shard-0.tar"))
    with pytest.raises(tarfile.ReadError, match=r"shard-0\.tar is gzip-compressed"):
        store.read("a.png")
    spec = SourceSpec(format="caption", path=str(tmp_path / "caps.jsonl"), image_root=str(tmp_path / "shard-*.tar"))
    with pytest.raises(tarfile.ReadError, match=r"shard-0\.tar is gzip-compressed"):  # at once, not per sample
        requests_from_source(spec, role="score")
    (tmp_path / "junk.tar").write_bytes(b"\0" * 10 + b"junk" * 200)
    with pytest.raises(tarfile.ReadError, match=r"junk\.tar"):
        open_image_store(str(tmp_path / "junk.tar")).read("a.png")


def test_requests_encode_exactly_as_training_batches(tmp_path, tok):
    """Caption pairs from tar shards: the scored request is token- and pixel-identical to the training row."""
    write_shard(tmp_path / "shard-000.tar", [f"img/{i}.png" for i in range(3)])
    caps = [{"id": f"c{i}", "image": f"img/{i}.png", "caption": f"A grey square number {i}."} for i in range(3)]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    spec = SourceSpec(format="caption", path=str(tmp_path / "caps.jsonl"), image_root=str(tmp_path / "shard-*.tar"))
    cfg = tiny_cfg()
    image = ImageSpec(image_size=16, tokens_per_image=TPI, mean=(0.5,) * 3, std=(0.5,) * 3)
    data = DataConfig(sources=(spec,), batch_size=1, seq_len=64, max_images=1, image=image, pack=False,
                      shuffle=False, num_epochs=1, shard_index=0, shard_count=1,
                      text=TextSpec(template="hf", image_token_id=cfg.image_token_id))
    with make_iterator(data, tok) as it:
        batches = [(b, list(it.last_ids)) for b in it]
    enc = Encoder(tok, cfg)
    scored = {r.id: enc.scored(r) for r in requests_from_source(spec, role="score")}
    for batch, (sid,) in batches:
        row = batch["segment_ids"][0] == 1
        e = scored[sid]
        assert batch["input_ids"][0][row].tolist() == e.ids
        np.testing.assert_array_equal(batch["pixel_values"][0], e.pixels[0])
        assert tok.decode(np.asarray(e.ids)[e.target]) == caps[int(sid[1:])]["caption"] + "<|im_end|>"
    gen = requests_from_source(spec, role="generate")
    assert gen[1].meta == {"image": "img/1.png", "caption": "A grey square number 1."}
    assert enc.prompt(gen[1]).ids == [cfg.image_token_id] * TPI  # "plain": the image, then the caption follows
    asked = requests_from_source(spec, role="generate", prompt="Describe it.")[1]
    ids = enc.prompt(asked).ids
    after_image = ids[max(i for i, t in enumerate(ids) if t == cfg.image_token_id) + 1:]
    assert asked.template is None and ids.count(cfg.image_token_id) == TPI
    assert tok.decode(after_image) == "\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"


def test_preference_interleaved_and_tfds_sources(tmp_path, tok):
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png(i))
    pairs = [{"id": "p", "image": "0.png", "prompt": "Colour?", "chosen": "Grey.", "rejected": "Red.", "score": 2}]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    spec = SourceSpec(format="preference", path=str(tmp_path / "pairs.json"), image_root=str(tmp_path / "imgs"))
    enc = Encoder(tok, tiny_cfg())
    chosen, rejected = requests_from_source(spec, role="score")
    assert (chosen.id, rejected.id) == ("p/chosen", "p/rejected")
    assert chosen.meta == {"image": "0.png", "score": 2, "side": "chosen"}
    assert tok.decode(np.asarray(enc.scored(rejected).ids)[enc.scored(rejected).target]) == "Red.<|im_end|>"
    (prompt,) = requests_from_source(spec, role="generate")
    assert prompt.prompt_messages() == [{"role": "user", "content": "<image>\nColour?"}]

    doc = {"id": "d", "text_list": ["One.", "Two."], "image_info": [{"image_name": "1.png", "matched_text_index": 1}]}
    (tmp_path / "docs.jsonl").write_text(json.dumps(doc) + "\n")
    spec = SourceSpec(format="interleaved", path=str(tmp_path / "docs.jsonl"), image_root=str(tmp_path / "imgs"))
    (doc,) = requests_from_source(spec, role="score")
    e = enc.scored(doc, which="all")
    assert doc.template == "plain" and doc.loss_on == "all" and len(e.pixels) == 1
    assert tok.decode([t for t, m in zip(e.ids, e.target) if m]) == "One. Two.<|im_end|>"
    with pytest.raises(ValueError, match="only be scored"):
        requests_from_source(spec, role="generate")
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        requests_from_source(SourceSpec(path=str(tmp_path / "pairs.json"), image_root=str(tmp_path / "no-such-folder")))

    tfds = pytest.importorskip("tensorflow_datasets")

    class VlmjaxReqCaptions(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(), "image": tfds.features.Image(encoding_format="png"),
                "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(2):
                yield i, {"id": f"t{i}", "image": png(i), "caption": f"Square {i}."}

    VlmjaxReqCaptions(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    spec = SourceSpec(format="caption", tfds="vlmjax_req_captions", tfds_data_dir=str(tmp_path / "tfds"))
    reqs = requests_from_source(spec, role="score")
    assert sorted(r.id for r in reqs) == ["t0", "t1"]
    e = enc.scored(next(r for r in reqs if r.id == "t1"))
    assert tok.decode(np.asarray(e.ids)[e.target]) == "Square 1.<|im_end|>" and e.pixels.shape == (1, 16, 16, 3)


@pytest.mark.parametrize("which, extra, message", [
    ("generate", ["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    ("generate", ["--max-new-tokens", "-5"], "argument --max-new-tokens: must be >= 1, got -5"),
    ("generate", ["--top-p", "1.5"], "argument --top-p: must be in (0, 1]"),
    ("generate", ["--mesh", "a,b"], "argument --mesh: expected data,fsdp,tensor sizes"),
    ("generate", ["--image-folder", "{tmp}/nowhere", "--prompt", "Hi"], "--image-folder {tmp}/nowhere: no such folder"),
    ("generate", ["--data", "{tmp}/d.json", "--image-folder", "{tmp}/nowhere"], "image root {tmp}/nowhere is not"),
    ("generate", ["--data", "{tmp}/none.json"], "--data {tmp}/none.json: no such file"),
    ("generate", ["--data", "{tmp}/d.json", "--mesh", "{too_many}"], "needs {too_many} devices, have"),
    ("eval", ["vqav2"], "vqav2 needs --questions"),
    ("eval", ["--n", "0", "easy_vqa"], "argument --n: must be >= 1, got 0"),
    ("eval", ["pope", "--file", "{tmp}/d.json", "--images", "{tmp}/nowhere"], "--images {tmp}/nowhere: no such folder"),
    ("eval", ["textvqa", "--file", "{tmp}/d.json", "--images", "{tmp}"], "textvqa: cannot read its files"),
])
def test_cli_arguments_fail_with_one_clear_line(tmp_path, capsys, which, extra, message):
    """Nonsense arguments are one `prog: error:` line (exit 2), before any model loads (--model is an empty folder)."""
    import jax

    from vlmjax.eval.__main__ import main as eval_main
    from vlmjax.generate.__main__ import main as gen_main

    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Q"}]}]))
    fill = lambda s: s.format(tmp=tmp_path, too_many=jax.device_count() + 1)
    base = ["--model", str(tmp_path), "--out", str(tmp_path / "o")]
    argv, main = base, eval_main
    if which == "generate":
        own_source = "--data" in extra or "--prompt" in extra
        argv, main = base + ([] if own_source else ["--data", str(tmp_path / "d.json")]), gen_main
    with pytest.raises(SystemExit) as e:
        main(argv + [fill(x) for x in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and fill(message) in err[-1] and err[-1].startswith(f"python -m vlmjax.{which}: error:")
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("module", ["generate", "eval"])
def test_cli_help_has_a_prog_and_help_on_every_flag(module, capsys):
    import importlib

    parser = importlib.import_module(f"vlmjax.{module}.__main__").parser()
    assert parser.prog == f"python -m vlmjax.{module}"
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m vlmjax.{module}")


def readme_commands(prefix):
    """The README's `prefix ...` command lines (backslash continuations joined)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip().startswith(prefix)]


def test_readme_generation_commands_run_verbatim(tmp_path, tok, monkeypatch, capsys):
    """Each documented `python -m vlmjax.generate` line, argument for argument, on files named as in the README
    (the model loader is stubbed with a tiny random VLM; loading itself is tested in test_generate)."""
    import shlex

    from test_generate import smol_vlm

    from vlmjax.generate import __main__ as cli_main
    from vlmjax.generate import loading

    commands = readme_commands("python -m vlmjax.generate")
    assert len(commands) == 3
    monkeypatch.chdir(tmp_path)
    (tmp_path / "MODEL_DIR").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "IMGS").mkdir()
    (tmp_path / "IMGS" / "a.png").write_bytes(png(0))
    (tmp_path / "llava.json").write_text(json.dumps([{"id": "q", "image": "a.png", "conversations": [
        {"from": "human", "value": "What is it?"}]}]))
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "000.tar", ["img/0.png", "img/1.png"])
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"id": f"c{i}", "image": f"img/{i}.png", "caption": "A."})
                                                 + "\n" for i in range(2)))
    model = smol_vlm()
    monkeypatch.setattr(loading, "load_model", lambda *a, **kw: (model, model.cfg, tok))
    for command in commands:
        argv = shlex.split(command)[3:]
        assert cli_main.main(argv) == 0, command
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert summary["written"] >= 1 and summary["errors"] == 0, (command, summary)
