"""Llama-family decoder (Llama-2/3, Mistral, Qwen2, SmolLM2): GQA, RMSNorm, SwiGLU, HF rotate-half RoPE.

Layers are stacked (leading 'layers' axis) and run with lax.scan, so compile time does not grow with depth.
Shape suffixes: b batch, t/s sequence, d model dim, h query heads, k kv heads, f mlp dim, v vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlmjax.models.config import LLMConfig, to_dtype
from vlmjax.models.layers import Linear, RMSNorm, activation, apply_rope, constrain, param, normal_init, rope_inv_freq
from vlmjax.models.layers import scan_layers, stacked
from vlmjax.ops.attention import attention


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.q_proj = Linear((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear((d,), (k, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear((d,), (k, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear((h, hd), (d,), ("heads", "head_dim", "embed"), **kw)
        self.impl = cfg.attention_impl

    def __call__(self, x_btd, positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq):
        q_bthd = apply_rope(self.q_proj(x_btd), positions_bt, inv_freq)
        k_btkd = apply_rope(self.k_proj(x_btd), positions_bt, inv_freq)
        v_btkd = self.v_proj(x_btd)
        q_bthd = constrain(q_bthd, ("batch", "length", "heads", "head_dim"))
        out_bthd = attention(
            q_bthd, k_btkd, v_btkd, segment_ids=segment_ids_bt, causal=True, prefix_mask=prefix_mask_bt, impl=self.impl
        )
        return self.o_proj(out_bthd)


class MLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.gate_proj = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.up_proj = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.down_proj = Linear((f,), (d,), ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_btd):
        h_btf = self.act(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        h_btf = constrain(h_btf, ("batch", "length", "mlp"))
        return self.down_proj(h_btf)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq):
        h = self.self_attn(self.input_layernorm(x_btd), positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq)
        x_btd = x_btd + h
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        return constrain(x_btd, ("batch", "length", "act_embed"))


class LLM(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
        self.embed_tokens = param(rngs, normal_init(0.02), (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdtype)
        self.layers = stacked(cfg.num_layers, lambda r: DecoderLayer(cfg, rngs=r), rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        # A tied model has no lm_head at all (no second copy, no optimizer moments for it).
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear((cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), dtype=dtype, param_dtype=pdtype, rngs=rngs)
        )

    def embed(self, input_ids_bt: jax.Array) -> jax.Array:
        x_btd = jnp.take(self.embed_tokens[...], input_ids_bt, axis=0).astype(to_dtype(self.cfg.dtype))
        return constrain(x_btd, ("batch", "length", "act_embed"))

    def hidden_states(self, x_btd, positions_bt=None, segment_ids_bt=None, prefix_mask_bt=None) -> jax.Array:
        """Decoder stack on input embeddings; returns the final-norm hidden states (B, T, D)."""
        b, t, _ = x_btd.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rope_inv_freq(self.cfg.dim_per_head, self.cfg.rope_theta, self.cfg.rope_scaling)

        def body(layer, x):
            return layer(x, positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq)

        x_btd = scan_layers(self.layers, x_btd, body, remat=self.cfg.remat)
        return self.norm(x_btd)

    def logits(self, h_btd: jax.Array) -> jax.Array:
        dtype = to_dtype(self.cfg.dtype)
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h_btd.astype(dtype), self.embed_tokens[...].astype(dtype))
        return self.lm_head(h_btd)

    def __call__(self, input_ids_bt, positions_bt=None, segment_ids_bt=None, prefix_mask_bt=None):
        return self.logits(self.hidden_states(self.embed(input_ids_bt), positions_bt, segment_ids_bt, prefix_mask_bt))
