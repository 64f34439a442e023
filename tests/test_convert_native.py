"""`convert to-hf` and `convert average` on native and HF folders (tiny models, a tiny word-level tokenizer)."""

import numpy as np
import pytest
from flax import nnx

transformers = pytest.importorskip("transformers")

from test_native import params, tiny_cfg  # noqa: E402
from vlmjax.convert.__main__ import main as convert_main  # noqa: E402
from vlmjax.convert.average import Mismatch, average_folders  # noqa: E402
from vlmjax.convert.hf import load_vlm, save_vlm  # noqa: E402
from vlmjax.convert.native import load_native, save_native  # noqa: E402
from vlmjax.models import VLM  # noqa: E402
from vlmjax.models.config import with_dtypes  # noqa: E402


def tokenizer(vocab=64, extra=()):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3 - len(extra))] + list(extra)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def write(folder, projector="mlp2x_gelu", seed=0, tok=None, **kw):
    model = VLM(tiny_cfg(projector, **kw), rngs=nnx.Rngs(seed))
    save_native(model, folder, tokenizer=tok or tokenizer())
    return model


def test_to_hf_where_hf_can_express_the_model(tmp_path, capsys):
    model = write(tmp_path / "mlp")
    assert convert_main(["to-hf", str(tmp_path / "mlp"), "--out", str(tmp_path / "hf")]) == 0
    back, _ = load_vlm(tmp_path / "hf")
    pb = params(back)
    assert sorted(pb) == sorted(params(model)) and all(np.array_equal(pb[k], v) for k, v in params(model).items())
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").convert_tokens_to_ids("w0") == 3
    write(tmp_path / "lin", "linear")
    assert convert_main(["to-hf", str(tmp_path / "lin"), "--out", str(tmp_path / "hf2")]) == 2
    assert "'linear' cannot be exported" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_average_equals_numpy_weighted_mean(tmp_path):
    models = [write(tmp_path / f"m{i}", "downsample2x2_mlp", seed=i) for i in range(3)]
    assert convert_main(["average", *(str(tmp_path / f"m{i}") for i in range(3)), "--out", str(tmp_path / "soup"),
                         "--weights", "2", "1", "1"]) == 0
    soup, cfg = load_native(tmp_path / "soup")
    assert cfg == with_dtypes(tiny_cfg("downsample2x2_mlp"), "float32")
    ps = [params(m) for m in models]
    for k, v in params(soup).items():  # independent reference: float64 numpy mean, fp32 tolerance
        ref = (2 * ps[0][k].astype(np.float64) + ps[1][k] + ps[2][k]) / 4
        np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-7, err_msg=k)


def test_average_reads_hf_folders_too(tmp_path):
    a = write(tmp_path / "a", seed=0)
    b = VLM(tiny_cfg(), rngs=nnx.Rngs(1))
    save_vlm(b, tmp_path / "b_hf", tokenizer=tokenizer())
    average_folders([tmp_path / "a", tmp_path / "b_hf"], tmp_path / "soup")
    soup, _ = load_native(tmp_path / "soup")
    pa, pb = params(a), params(b)
    for k, v in params(soup).items():
        np.testing.assert_allclose(v, (pa[k].astype(np.float64) + pb[k]) / 2, rtol=1e-6, atol=1e-7, err_msg=k)


def test_average_mismatches_name_what_differs(tmp_path):
    write(tmp_path / "a")
    write(tmp_path / "proj", "linear")
    with pytest.raises(Mismatch, match="model config field projector"):
        average_folders([tmp_path / "a", tmp_path / "proj"], tmp_path / "x")
    write(tmp_path / "tiles", image_tiling="catty")
    with pytest.raises(Mismatch, match="model config field image_tiling: .* 'none', .* 'catty'"):
        average_folders([tmp_path / "a", tmp_path / "tiles"], tmp_path / "x")
    write(tmp_path / "tok", tok=tokenizer(extra=("<image>",)))
    with pytest.raises(Mismatch, match="tokenizer of .*tok differs"):
        average_folders([tmp_path / "a", tmp_path / "tok"], tmp_path / "x")
    bf = VLM(with_dtypes(tiny_cfg(), "float32", "bfloat16"), rngs=nnx.Rngs(0))
    save_native(bf, tmp_path / "bf16", tokenizer=tokenizer())
    with pytest.raises(Mismatch, match=r"tensor llm/embed_tokens: .* float32\[64, 32\], .* bfloat16\[64, 32\]"):
        average_folders([tmp_path / "a", tmp_path / "bf16"], tmp_path / "x")
    from safetensors.numpy import load_file, save_file

    f = tmp_path / "tok" / "model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if k != "projector/linear_2/bias"}, f)
    write(tmp_path / "tok2")
    with pytest.raises(Mismatch, match="tensor projector/linear_2/bias is in .*tok2 only"):
        average_folders([tmp_path / "tok", tmp_path / "tok2"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_model_init_checkpoint_reads_native_and_hf_folders(tmp_path):
    from ml_collections import ConfigDict

    from vlmjax.generate.loading import load_model
    from vlmjax.train.setup import build_model

    model = write(tmp_path / "native")
    save_vlm(model, tmp_path / "hf", tokenizer=tokenizer())
    ref = params(model)
    for init, folder in (("checkpoint", "native"), ("checkpoint", "hf"), ("native", "native"), ("hf", "hf")):
        mc = ConfigDict(dict(init=init, path=str(tmp_path / folder), dtype="float32", param_dtype="float32"))
        loaded, cfg, tok = build_model(mc)
        assert tok.convert_tokens_to_ids("w0") == 3 and cfg.projector == "mlp2x_gelu"
        assert all(np.array_equal(v, ref[k]) for k, v in params(loaded).items()), (init, folder)
    with pytest.raises(ValueError, match="is a hf folder, but native was asked for"):
        build_model(ConfigDict(dict(init="native", path=str(tmp_path / "hf"))))
    m, cfg, tok = load_model(tmp_path / "native")
    assert cfg == tiny_cfg() and all(np.array_equal(v, ref[k]) for k, v in params(m).items())
