"""Import never loads wrong weights (exact shapes, float dtypes), the checkpoints found in the wild load (SigLIP with
its attention-pool head, Llama with attention_bias), and export writes a readable folder.

Tolerance for logit parity vs transformers (torch CPU, fp32): max abs difference <= 1e-4.
"""

import os
import stat

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_fixtures as F  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from vlmjax.convert import hf as hfconv  # noqa: E402
from vlmjax.convert.hf_config import UnsupportedModel  # noqa: E402

TOL = 1e-4


def _rewrite(folder, edit):
    """Apply `edit(tensors)` to a one-file safetensors checkpoint in place."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_transposed_non_square_weight_is_rejected(tmp_path):
    F.make_causal_lm(tmp_path, "llama")
    name = "model.layers.1.mlp.gate_proj.weight"  # HF (intermediate=96, hidden=64)

    def transpose(t):
        t[name] = np.ascontiguousarray(t[name].T)  # same element count, stored (in, out)

    _rewrite(tmp_path, transpose)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}' has shape \(64, 96\), expected \(96, 64\)"):
        hfconv.load_causal_lm(tmp_path)


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.bool_])
def test_non_float_tensor_is_rejected(tmp_path, dtype):
    F.make_causal_lm(tmp_path, "llama")
    name = "model.layers.0.self_attn.o_proj.weight"

    def to_int(t):
        t[name] = (t[name] * 100).astype(dtype)

    _rewrite(tmp_path, to_int)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}' has dtype {np.dtype(dtype).name}"):
        hfconv.load_causal_lm(tmp_path)


def test_half_precision_tensors_still_load(tmp_path):
    ref = F.make_causal_lm(tmp_path, "llama")
    _rewrite(tmp_path, lambda t: t.update({k: v.astype(np.float16) for k, v in t.items()}))
    model, _ = hfconv.load_causal_lm(tmp_path)
    w = ref.model.layers[0].mlp.up_proj.weight.detach().numpy().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.layers.mlp.up_proj.kernel[...][0]), w.T)


def _llava_batch(cfg):
    t = cfg.tokens_per_image
    ids = np.array([[1, 5] + [F.IMAGE_TOKEN] * t + [7, 8, 9]], np.int64)
    return ids, F.pixels_nchw(1)


def _vlm_parity(ref_model, model, cfg):
    ids, px = _llava_batch(cfg)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
    ours = np.asarray(model(ids.astype(np.int32), px.transpose(0, 2, 3, 1), np.zeros(1, np.int32)))
    return float(np.abs(ref - ours).max())


def test_llava_with_siglip_head_loads(tmp_path):
    """transformers 5 names (`vision_tower.head.*`) and transformers 4 names (`vision_tower.vision_model.head.*`)."""
    ref = F.make_llava(tmp_path, "llama", "siglip", vision_head=True, vision_feature_select_strategy="full")
    model, cfg = hfconv.load_vlm(tmp_path)
    assert _vlm_parity(ref, model, cfg) <= TOL

    def legacy(t):
        for k in list(t):
            if k.startswith("vision_tower."):
                t["vision_tower.vision_model." + k[len("vision_tower."):]] = t.pop(k)

    _rewrite(tmp_path, legacy)
    model, cfg = hfconv.load_vlm(tmp_path)
    assert _vlm_parity(ref, model, cfg) <= TOL
    # only the tower's head is known-unused: a stray tensor elsewhere is still an error
    _rewrite(tmp_path, lambda t: t.update({"language_model.model.head.probe": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"1 tensors not used by the model.*language_model\.model\.head\.probe"):
        hfconv.load_vlm(tmp_path)


def test_siglip_vision_folder_with_head_loads(tmp_path):
    torch.manual_seed(0)
    ref = transformers.AutoModel.from_config(F.vision_config("siglip", head=True)).eval()
    F._randomize(ref)
    ref.save_pretrained(tmp_path)
    px = F.pixels_nchw(2)
    with torch.no_grad():
        want = ref(pixel_values=torch.tensor(px)).last_hidden_state.numpy()
    for _ in ("transformers 5 names", "transformers 4 names"):
        model, _ = hfconv.load_vision_tower(tmp_path)
        assert np.abs(want - np.asarray(model(px.transpose(0, 2, 3, 1)))).max() <= TOL
        _rewrite(tmp_path, lambda t: t.update({"vision_model." + k: t.pop(k) for k in list(t)}))


def test_llama_attention_bias_round_trip(tmp_path):
    """HF Llama attention_bias=True biases q, k, v and o_proj: import, parity, export, transformers reload."""
    ref = F.make_causal_lm(tmp_path / "src", "llama", attention_bias=True)
    assert ref.model.layers[0].self_attn.o_proj.bias is not None
    model, cfg = hfconv.load_causal_lm(tmp_path / "src")
    assert cfg.attention_bias and cfg.o_proj_bias
    ids = np.random.default_rng(0).integers(0, F.V, size=(2, 11))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(want - np.asarray(model(ids.astype(np.int32)))).max() <= TOL
    hfconv.save_causal_lm(model, tmp_path / "out")
    names = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "model.layers.1.self_attn.o_proj.bias" in names
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        np.testing.assert_array_equal(back(input_ids=torch.tensor(ids)).logits.numpy(), want)


def test_llava_llama_attention_bias_parity(tmp_path):
    ref = F.make_llava(tmp_path, "llama", "clip", text_over={"attention_bias": True})
    model, cfg = hfconv.load_vlm(tmp_path)
    assert cfg.llm.o_proj_bias
    assert _vlm_parity(ref, model, cfg) <= TOL


def test_bias_layouts_hf_cannot_express_are_rejected_on_export(tmp_path):
    import dataclasses

    from flax import nnx

    from vlmjax.models.config import LLMConfig
    from vlmjax.models.llm import LLM

    base = LLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    inexpressible = [("llama", True, False), ("llama", False, True), ("qwen2", True, True), ("mistral", True, False)]
    for family, qkv, o in inexpressible:
        cfg = dataclasses.replace(base, family=family, attention_bias=qkv, o_proj_bias=o)
        with pytest.raises(UnsupportedModel, match="o_proj bias"):
            hfconv.save_causal_lm(LLM(cfg, rngs=nnx.Rngs(0)), tmp_path / f"{family}{qkv}{o}")
        assert not (tmp_path / f"{family}{qkv}{o}").exists()


def test_exported_files_are_world_readable(tmp_path):
    old = os.umask(0o022)
    try:
        F.make_causal_lm(tmp_path / "src", "llama")
        model, _ = hfconv.load_causal_lm(tmp_path / "src")
        hfconv.save_causal_lm(model, tmp_path / "one")
        hfconv.save_causal_lm(model, tmp_path / "sharded", max_shard_bytes=20_000)
    finally:
        os.umask(old)
    for folder in ("one", "sharded"):
        files = sorted((tmp_path / folder).iterdir())
        assert any(f.suffix == ".safetensors" for f in files)
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        assert set(modes.values()) == {0o644}, modes


def _write_llama_gguf(ref, path):
    """An F32 llama-arch GGUF of an HF Llama, written as llama.cpp's converter does (q/k weights AND biases row-
    permuted for interleaved RoPE)."""
    gguf = pytest.importorskip("gguf")
    c = ref.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_context_length(c.max_position_embeddings)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])

    def permute(x, n):  # convert_hf_to_gguf.py LlamaModel.permute
        return x.reshape(n, 2, x.shape[0] // n // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        attn = (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"))
        for hf_name, name in attn:
            for kind in ("weight", "bias"):
                x = sd[p + f"self_attn.{hf_name}.{kind}"]
                if hf_name in ("q_proj", "k_proj"):
                    x = permute(x, c.num_attention_heads if hf_name == "q_proj" else c.num_key_value_heads)
                w.add_tensor(f"blk.{i}.{name}.{kind}", np.ascontiguousarray(x))
        for hf_name, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            w.add_tensor(f"blk.{i}.{name}.weight", sd[p + f"mlp.{hf_name}.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_llama_gguf_with_attention_biases(tmp_path):
    """llama.cpp keeps Llama's q/k/v/o biases (attn_*.bias) and permutes the q/k ones: all four must come back."""
    from vlmjax.convert.gguf import load_gguf

    ref = F.make_causal_lm(tmp_path / "src", "llama", attention_bias=True)
    _write_llama_gguf(ref, tmp_path / "m.gguf")
    model, cfg = load_gguf(tmp_path / "m.gguf")
    assert cfg.attention_bias and cfg.o_proj_bias
    ids = np.random.default_rng(0).integers(0, F.V, size=(2, 9))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(want - np.asarray(model(ids.astype(np.int32)))).max() <= TOL
