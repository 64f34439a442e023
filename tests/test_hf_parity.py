"""Logit parity against transformers (torch CPU) and the HF round trip, for every supported family.

Tolerance: fp32, max abs logit difference <= 1e-4 over all non-padding positions.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_fixtures as F  # noqa: E402
from flax import nnx  # noqa: E402

from vlmjax.convert import hf as hfconv  # noqa: E402

TOL = 1e-4
CASES = [("llama", "clip"), ("llama3", "siglip"), ("mistral", "clip"), ("qwen2", "siglip"), ("smollm2", "clip")]


def mixed_batch(T: int):
    """Row 0: one image + text, right padding. Row 1: text only. Row 2: two interleaved images."""
    I = F.IMAGE_TOKEN
    rows = [
        [1, 5, 6] + [I] * T + [7, 8, 9],
        [1, 10, 11, 12, 13, 14, 15],
        [1, 20] + [I] * T + [21, 22] + [I] * T + [23],
    ]
    S = max(map(len, rows))
    ids = np.zeros((3, S), np.int64)
    mask = np.zeros((3, S), np.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
        mask[r, : len(row)] = 1
    pixels = F.pixels_nchw(3)
    image_rows = np.array([0, 2, 2], np.int32)
    return ids, mask, pixels, image_rows


def hf_logits(model, ids, mask, pixels):
    pos = np.clip(mask.cumsum(1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                    pixel_values=torch.tensor(pixels))
    return out.logits.float().numpy()


# jitted: eager (op-by-op) calls compile every op of the model on its own, several times slower on CPU
jit_call = nnx.jit(lambda m, *args: m(*args))


def our_logits(model, ids, mask, pixels, image_rows):
    pos = np.clip(mask.cumsum(1) - 1, 0, None).astype(np.int32)
    return np.asarray(jit_call(model, ids.astype(np.int32), pixels.transpose(0, 2, 3, 1), image_rows, pos,
                               mask.astype(np.int32)))


@pytest.mark.parametrize("family,tower", CASES)
def test_llava_logits_match_transformers(tmp_path, family, tower):
    strategy = "full" if tower == "siglip" else "default"
    ref_model = F.make_llava(tmp_path, family, tower, vision_feature_select_strategy=strategy)
    model, cfg = hfconv.load_vlm(tmp_path)
    ids, mask, pixels, image_rows = mixed_batch(cfg.tokens_per_image)
    ref = hf_logits(ref_model, ids, mask, pixels)
    ours = our_logits(model, ids, mask, pixels, image_rows)
    real = mask.astype(bool)
    err = np.abs(ref[real] - ours[real]).max()
    assert err <= TOL, f"{family}/{tower}: max |dlogit| = {err:.2e}"


@pytest.mark.parametrize("family,tower", [("llama", "clip"), ("qwen2", "siglip")])
def test_round_trip_bit_exact_and_hf_loads_export(tmp_path, family, tower):
    strategy = "full" if tower == "siglip" else "default"
    F.make_llava(tmp_path / "src", family, tower, vision_feature_select_strategy=strategy)
    model, cfg = hfconv.load_vlm(tmp_path / "src")
    hfconv.save_vlm(model, tmp_path / "out", max_shard_bytes=200_000)  # forces several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    back, cfg2 = hfconv.load_vlm(tmp_path / "out")
    assert cfg2 == cfg
    a, b = nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, va), (_, vb) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(path))
    hf_back = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    ids, mask, pixels, image_rows = mixed_batch(cfg.tokens_per_image)
    real = mask.astype(bool)
    err = np.abs(hf_logits(hf_back, ids, mask, pixels)[real] - our_logits(model, ids, mask, pixels, image_rows)[real]).max()
    assert err <= TOL


@pytest.mark.parametrize("family", ["llama", "qwen2", "smollm2"])
def test_causal_lm_import_export(tmp_path, family):
    ref_model = F.make_causal_lm(tmp_path / "src", family)
    model, cfg = hfconv.load_causal_lm(tmp_path / "src")
    ids = np.random.default_rng(0).integers(0, F.V, size=(2, 19))
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(ref - np.asarray(jit_call(model, ids.astype(np.int32)))).max() <= TOL
    assert ("lm_head" in nnx.state(model)) == (not cfg.tie_word_embeddings)
    hfconv.save_causal_lm(model, tmp_path / "out")
    hf_back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        np.testing.assert_array_equal(hf_back(input_ids=torch.tensor(ids)).logits.numpy(), ref)


def test_vision_tower_last_hidden_state(tmp_path):
    """Towers alone: CLIPVisionModel / SiglipVisionModel last_hidden_state (post-LN semantics differ)."""
    for kind in ("clip", "siglip"):
        vc = F.vision_config(kind)
        torch.manual_seed(0)
        ref_model = transformers.AutoModel.from_config(vc).eval()
        F._randomize(ref_model)
        ref_model.save_pretrained(tmp_path / kind)
        model, _ = hfconv.load_vision_tower(tmp_path / kind)
        px = F.pixels_nchw(2)
        with torch.no_grad():
            ref = ref_model(pixel_values=torch.tensor(px)).last_hidden_state.numpy()
        assert np.abs(ref - np.asarray(jit_call(model, px.transpose(0, 2, 3, 1)))).max() <= TOL, kind


def test_clear_errors(tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    F.make_llava(tmp_path, "llama", "clip")
    model, cfg = hfconv.load_vlm(tmp_path)
    ids, mask, pixels, image_rows = mixed_batch(cfg.tokens_per_image)
    with pytest.raises(ValueError, match=r"sample batch row 1: 0 image placeholder tokens .* 1 image\(s\)"):
        model(ids.astype(np.int32), pixels.transpose(0, 2, 3, 1), np.array([0, 1, 2], np.int32))
    # a missing tensor and a wrongly shaped tensor are named
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    broken = dict(tensors)
    broken.pop(name)
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        hfconv.load_vlm(tmp_path)
    broken[name] = tensors[name][:, :-1]
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        hfconv.load_vlm(tmp_path)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json["text_config"]["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        hfconv.load_vlm(tmp_path)
