"""The native model folder (vlmjax_config.json + safetensors by parameter path): bit-exact round trips for every
projector and tiling, sharding, LoRA adapters, errors naming the tensor, and the preprocessing the config carries."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from vlmjax.convert.native import CONFIG_FILE, folder_kind, hf_unsupported_reason, load_native, save_native
from vlmjax.data.image import load_image, model_image_spec, normalize
from vlmjax.models import LLMConfig, VisionConfig, VLM, VLMConfig

PROJECTORS = ["linear", "mlp2x_gelu", "downsample2x2_mlp", "pixel_shuffle_mlp"]
TILINGS = {
    "none": {},
    "llava_next": dict(image_layout="llava_next", image_grid_pinpoints=((56, 28), (28, 56), (56, 56))),
    "catty": dict(image_tiling="catty", image_max_tiles=4, image_resize_mode="resize"),
}


def tiny_cfg(projector="mlp2x_gelu", tiling="none", **kw) -> VLMConfig:
    return VLMConfig(llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                   num_kv_heads=2),
                     vision=VisionConfig(image_size=28, patch_size=7, hidden_size=16, intermediate_size=32,
                                         num_layers=2, num_heads=2),
                     image_token_id=63, projector=projector, **TILINGS[tiling], **kw)


def params(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


def image_batch(cfg):
    """One 40x20 image through the preprocessing the config records -> the model's inputs."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (20, 40, 3), dtype=np.uint8))
    spec = model_image_spec(cfg)
    tiles, pos = load_image(img, spec)
    n_tok = len(pos) if pos is not None else len(tiles) * cfg.tokens_per_image
    ids = np.concatenate([[1], np.full(n_tok, cfg.image_token_id), [5, 6, 7, 8]])[None].astype(np.int32)
    args = (ids, normalize(tiles, spec), np.zeros(len(tiles), np.int32))
    return args, (None if pos is None else np.asarray(pos, np.int32)[None]), len(tiles)


# logits need one compile per config: every projector and every tiling appears in one of these pairs
LOGIT_CASES = {("linear", "none"), ("mlp2x_gelu", "llava_next"), ("downsample2x2_mlp", "catty"),
               ("pixel_shuffle_mlp", "llava_next")}


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("projector", PROJECTORS)
def test_every_projector_and_tiling_round_trips_bit_exactly(tmp_path, projector, tiling):
    cfg = tiny_cfg(projector, tiling)
    model = VLM(cfg, rngs=nnx.Rngs(1))
    save_native(model, tmp_path / "m")
    assert folder_kind(tmp_path / "m") == "native"
    loaded, cfg2 = load_native(tmp_path / "m")
    assert cfg2 == cfg and model_image_spec(cfg2) == model_image_spec(cfg)
    assert_same_params(model, loaded)
    if (projector, tiling) not in LOGIT_CASES:
        return
    args, image_pos, n_tiles = image_batch(cfg2)
    assert n_tiles == {"none": 1, "llava_next": 3, "catty": 3}[tiling]  # 40x20: 2x1 grid (+ global view / thumbnail)
    fwd = nnx.jit(lambda m, *a: m(*a, image_pos=image_pos))
    assert np.array_equal(np.asarray(fwd(model, *args)), np.asarray(fwd(loaded, *args)))


def test_sharded_folder_with_index_and_bf16(tmp_path):
    cfg = tiny_cfg("linear")
    model = VLM(cfg, rngs=nnx.Rngs(0))
    save_native(model, tmp_path / "m", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "m").glob("*.safetensors"))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(params(model))
    loaded, _ = load_native(tmp_path / "m")
    assert_same_params(model, loaded)
    # bf16 params are stored and reloaded as bf16, bit for bit
    import jax.numpy as jnp

    from vlmjax.models.config import with_dtypes

    bf = VLM(with_dtypes(cfg, "bfloat16", "bfloat16"), rngs=nnx.Rngs(0))
    save_native(bf, tmp_path / "bf")
    loaded_bf, cfg_bf = load_native(tmp_path / "bf", dtype="bfloat16", param_dtype="bfloat16")
    assert cfg_bf.param_dtype == "bfloat16" and params(loaded_bf)["projector/linear_1/kernel"].dtype == jnp.bfloat16
    assert_same_params(bf, loaded_bf)


def test_lora_kept_as_adapter_or_merged(tmp_path):
    from vlmjax.models.lora import add_lora, lora_rank

    cfg = tiny_cfg("linear")
    model = VLM(cfg, rngs=nnx.Rngs(0))
    add_lora(model, rank=4, alpha=8.0, targets=r"llm/layers/self_attn/(q|v)_proj$")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # B starts at zero: make the adapter do something
        if path[-1] == "lora_b":
            var.set_value(jax.random.normal(jax.random.key(3), var.shape, var.dtype) * 0.1)
    save_native(model, tmp_path / "adapter", lora="adapter")
    save_native(model, tmp_path / "merged", lora="merge")
    assert lora_rank(model) == 4  # merging worked on a copy
    rec = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["lora"]
    assert rec["rank"] == 4 and rec["alpha"] == 8.0 and len(rec["paths"]) == 2
    kept, _ = load_native(tmp_path / "adapter")
    assert lora_rank(kept) == 4
    assert_same_params(model, kept)
    args, _, _ = image_batch(cfg)
    fwd = nnx.jit(lambda m, *a: m(*a))
    assert np.array_equal(np.asarray(fwd(kept, *args)), np.asarray(fwd(model, *args)))
    merged, _ = load_native(tmp_path / "merged")
    assert lora_rank(merged) is None and not any("lora" in k for k in params(merged))
    p, m = params(model), params(merged)
    for proj in ("q_proj", "v_proj"):  # numpy reference: W + alpha/r * A @ B, per layer
        pre = f"llm/layers/self_attn/{proj}/"
        a, b = p[pre + "lora_a"], p[pre + "lora_b"]
        lead, r = a.shape[0], a.shape[-1]
        delta = np.einsum("lir,lro->lio", a.reshape(lead, -1, r), b.reshape(lead, r, -1)).reshape(p[pre + "kernel"].shape)
        np.testing.assert_allclose(m[pre + "kernel"], p[pre + "kernel"] + 2.0 * delta, rtol=1e-6, atol=1e-6)
        assert np.array_equal(m["llm/layers/self_attn/k_proj/kernel"], p["llm/layers/self_attn/k_proj/kernel"])


def test_bad_folders_are_errors_naming_the_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = tiny_cfg("linear")
    save_native(VLM(cfg, rngs=nnx.Rngs(0)), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    good = load_file(f)

    save_file({k: v for k, v in good.items() if k != "projector/linear_1/bias"}, f)
    with pytest.raises(KeyError, match="projector/linear_1/bias"):
        load_native(tmp_path / "m")
    save_file({**good, "projector/linear_1/bias": np.zeros(3, np.float32)}, f)
    with pytest.raises(ValueError, match=r"projector/linear_1/bias has shape \(3,\)"):
        load_native(tmp_path / "m")
    save_file({**good, "projector/extra": np.zeros(3, np.float32)}, f)
    with pytest.raises(ValueError, match="projector/extra"):
        load_native(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="neither"):
        folder_kind(tmp_path)


def test_hf_can_express_only_what_hf_import_gives_back():
    assert hf_unsupported_reason(tiny_cfg("mlp2x_gelu")) is None
    assert hf_unsupported_reason(tiny_cfg("mlp2x_gelu", "llava_next")) is None
    assert "'downsample2x2_mlp'" in hf_unsupported_reason(tiny_cfg("downsample2x2_mlp"))
    assert "image_tiling='catty'" in hf_unsupported_reason(tiny_cfg("mlp2x_gelu", "catty"))
    assert "image_resize_mode='crop'" in hf_unsupported_reason(tiny_cfg(image_resize_mode="crop"))


def test_config_records_preprocessing_and_consumers_use_it():
    none, nxt, catty = tiny_cfg(), tiny_cfg(tiling="llava_next"), tiny_cfg(tiling="catty")
    assert (none.image_tiling, none.image_resize_mode) == ("none", "pad_to_square_mean")
    assert (nxt.image_tiling, nxt.image_resize_mode) == ("anyres", "resize")  # filled from the layout
    assert json.loads(catty.to_json())["image_tiling"] == "catty"
    # the generation / eval / scoring Encoder takes the model's tiling (it used to encode one untiled image)
    from vlmjax.generate.requests import image_spec_for

    spec = image_spec_for(catty)
    assert (spec.tiling, spec.max_tiles, spec.resize_mode) == ("catty", 4, "resize")
    with pytest.raises(ValueError, match="resize_mode='pad_to_square_mean'.*image_resize_mode='resize'"):
        image_spec_for(catty, "pad_to_square_mean")
    with pytest.raises(ValueError, match="image_layout='llava_next' needs image_tiling='anyres'"):
        tiny_cfg(tiling="llava_next", image_tiling="none")


def test_a_loaded_adapter_continues_and_a_different_rank_is_an_error(tmp_path):
    from ml_collections import ConfigDict

    from vlmjax.models.lora import add_lora, lora_rank
    from vlmjax.train.setup import attach_lora

    model = VLM(tiny_cfg("linear"), rngs=nnx.Rngs(0))
    add_lora(model, rank=4, alpha=8.0, targets=r"llm/layers/self_attn/q_proj$")
    save_native(model, tmp_path / "m", lora="adapter")
    lc = ConfigDict(dict(rank=4, alpha=8.0, dropout=0.0, targets="q_proj$"))
    loaded, _ = load_native(tmp_path / "m")
    attach_lora(loaded, lc, seed=0)  # continues the stored adapter instead of adding a second one
    assert lora_rank(loaded) == 4 and np.array_equal(params(loaded)["llm/layers/self_attn/q_proj/lora_a"],
                                                     params(model)["llm/layers/self_attn/q_proj/lora_a"])
    lc.rank = 8
    with pytest.raises(ValueError, match="lora.rank=8 but the loaded model carries rank-4 adapters"):
        attach_lora(loaded, lc, seed=0)
