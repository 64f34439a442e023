"""Llama-family decoder (Llama-2/3, Mistral, Qwen2, SmolLM2): GQA, RMSNorm, SwiGLU, HF rotate-half RoPE.

Layers are stacked (leading 'layers' axis) and run with lax.scan, so compile time does not grow with depth.
Shape suffixes: b batch, t/s sequence, d model dim, h query heads, k kv heads, f mlp dim, v vocab.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlmjax.models.config import LLMConfig, to_dtype
from vlmjax.models.layers import Linear, RMSNorm, activation, apply_rope, constrain, param, normal_init, rope_inv_freq
from vlmjax.models.layers import scan_layers, stacked
from vlmjax.ops.attention import DECODE_IMPLS, attention, decode_attention


class KVCache(NamedTuple):
    """Keys and values of every layer, stacked like the layer params: (layers, B, kv_heads, S_max, head_dim);
    inside the unrolled decode loop, a tuple of per-layer (B, kv_heads, S_max, head_dim) arrays instead. Heads
    before slots: decode attention's batched matmuls over (b, k) then read the cache in place (see
    `decode_attention`'s kv_layout).

    Slot s of row b holds the token at RoPE position s (each row's sequence starts at slot 0), so a row's valid
    entries are exactly its first `length` slots: the layout `decode_attention`'s `kv_lengths` describes.
    """

    k: jax.Array
    v: jax.Array


CACHE_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


def _write_layer(cache_bksd, write_pos_b, new_btkd):
    """`_write_cache` for one layer's own array."""
    b, t = new_btkd.shape[:2]
    cols = write_pos_b[:, None] + jnp.arange(t)[None, :]
    # (b, t) index arrays around the head slice: the indexed block is (b, t, k, d), the new entries' own layout
    return cache_bksd.at[jnp.arange(b)[:, None], :, cols].set(new_btkd.astype(cache_bksd.dtype), mode="drop")


def _write_cache(cache_lbksd, layer, write_pos_b, new_btkd):
    """Scatter T new entries per row at slots write_pos[b] .. write_pos[b]+T-1 of one layer (in place in a loop)."""
    b, t = new_btkd.shape[:2]
    rows = jnp.arange(b)[:, None]
    cols = write_pos_b[:, None] + jnp.arange(t)[None, :]
    return cache_lbksd.at[layer, rows, :, cols].set(new_btkd.astype(cache_lbksd.dtype), mode="drop")


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.q_proj = Linear((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear((d,), (k, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear((d,), (k, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear((h, hd), (d,), ("heads", "head_dim", "embed"), use_bias=cfg.o_proj_bias, **kw)
        self.impl = cfg.attention_impl

    def _qkv(self, x_btd, positions_bt, inv_freq, fused=None):
        if fused is None:
            q, k, v = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        else:  # one matmul over the concatenated q|k|v kernel (see `fuse_projections`)
            q, k, v = _fused_linear(x_btd, fused["qkv"], fused.get("qkv_bias"), self.q_proj.dtype,
                                    (self.q_proj.out_shape, self.k_proj.out_shape, self.v_proj.out_shape))
        q_bthd = apply_rope(q, positions_bt, inv_freq)
        k_btkd = apply_rope(k, positions_bt, inv_freq)
        return constrain(q_bthd, ("batch", "length", "heads", "head_dim")), k_btkd, v

    def __call__(self, x_btd, positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq):
        q_bthd, k_btkd, v_btkd = self._qkv(x_btd, positions_bt, inv_freq)
        out_bthd = attention(
            q_bthd, k_btkd, v_btkd, segment_ids=segment_ids_bt, causal=True, prefix_mask=prefix_mask_bt, impl=self.impl
        )
        return self.o_proj(out_bthd)

    def cached(self, x_btd, positions_bt, inv_freq, cache: KVCache, layer, write_pos_b, prefill: bool, fused=None):
        """Attention that writes its K/V into `cache[layer]` at each row's `write_pos`.

        prefill: the T tokens are a whole (right-padded) prompt starting at slot 0, so plain causal attention over
        them is exact and cheaper than attending to all S_max slots. Otherwise the T tokens continue each row at
        its own write_pos and attend to the cache through `decode_attention`.
        """
        q_bthd, k_btkd, v_btkd = self._qkv(x_btd, positions_bt, inv_freq, fused)
        if isinstance(cache.k, tuple):  # one array per layer (unrolled decode, `layer` static): no slice copies
            k_layer = _write_layer(cache.k[layer], write_pos_b, k_btkd)
            v_layer = _write_layer(cache.v[layer], write_pos_b, v_btkd)
            new_cache = KVCache(_replace_at(cache.k, layer, k_layer), _replace_at(cache.v, layer, v_layer))
        else:
            k_all = constrain(_write_cache(cache.k, layer, write_pos_b, k_btkd), CACHE_AXES)
            v_all = constrain(_write_cache(cache.v, layer, write_pos_b, v_btkd), CACHE_AXES)
            k_layer, v_layer, new_cache = k_all[layer], v_all[layer], KVCache(k_all, v_all)
        if prefill:
            out_bthd = attention(q_bthd, k_btkd, v_btkd, causal=True, impl=self.impl)
        else:
            impl = self.impl if self.impl in DECODE_IMPLS else "auto"
            kv_lengths = write_pos_b + x_btd.shape[1]
            out_bthd = decode_attention(q_bthd, k_layer, v_layer, kv_lengths=kv_lengths, impl=impl, kv_layout="bksd")
        return self.o_proj(out_bthd), new_cache


def _replace_at(xs: tuple, i: int, x) -> tuple:
    return xs[:i] + (x,) + xs[i + 1:]


def unstack_cache(cache: KVCache) -> KVCache:
    """Stacked (layers, ...) cache -> one array per layer (what the unrolled decode carries)."""
    return KVCache(tuple(cache.k), tuple(cache.v))


def stack_cache(cache: KVCache) -> KVCache:
    return KVCache(jnp.stack(cache.k), jnp.stack(cache.v)) if isinstance(cache.k, tuple) else cache


def _fused_linear(x_btd, w_dn, b_n, dtype, out_shapes) -> tuple:
    """x @ [W_1 | W_2 | ...] (+ bias) split back into each projection's (B, T, *out_shape) output."""
    y = jnp.einsum("btd,dn->btn", x_btd.astype(dtype), w_dn.astype(dtype))
    if b_n is not None:
        y = y + b_n.astype(dtype)
    sizes = [math.prod(o) for o in out_shapes]
    parts = jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)
    return tuple(p.reshape(*y.shape[:2], *o) for p, o in zip(parts, out_shapes))


_FUSED = {"qkv": (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj")),
          "gate_up": (("mlp", "gate_proj"), ("mlp", "up_proj"))}


def _fuse_layer(layer_state):
    """One layer's state -> (state with the fused kernels emptied, {name: (D, N) concatenated kernel})."""
    fused = {}
    for name, paths in _FUSED.items():
        linears = [layer_state[a][b] for a, b in paths]
        d = linears[0]["kernel"].shape[0]
        fused[name] = jnp.concatenate([lin["kernel"][...].reshape(d, -1) for lin in linears], axis=-1)
        if "bias" in linears[0] and linears[0]["bias"][...] is not None:
            fused[name + "_bias"] = jnp.concatenate([lin["bias"][...].reshape(-1) for lin in linears])
        for lin in linears:  # the fused path never reads them: do not hold a second copy
            for key in ("kernel", "bias"):
                if key in lin:
                    lin[key] = lin[key].replace(jnp.zeros((0,), lin[key][...].dtype))
    return layer_state, fused


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split_layers(state, n: int, fuse: bool) -> tuple:
    layers = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]
    return tuple(_fuse_layer(s) if fuse else (s, None) for s in layers)


class MLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=to_dtype(cfg.dtype), param_dtype=to_dtype(cfg.param_dtype), rngs=rngs)
        self.gate_proj = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.up_proj = Linear((d,), (f,), ("embed", "mlp"), **kw)
        self.down_proj = Linear((f,), (d,), ("mlp", "embed"), **kw)
        self.act = activation(cfg.hidden_act)

    def __call__(self, x_btd, fused=None):
        if fused is None:
            g_btf, u_btf = self.gate_proj(x_btd), self.up_proj(x_btd)
        else:  # one matmul over the concatenated gate|up kernel (see `fuse_projections`)
            g_btf, u_btf = _fused_linear(x_btd, fused["gate_up"], None, self.gate_proj.dtype,
                                         (self.gate_proj.out_shape, self.up_proj.out_shape))
        h_btf = self.act(g_btf) * u_btf
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

    def with_parts(self, x_btd, positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq):
        """`__call__` that also returns the attention block output (after o_proj) and the MLP output."""
        attn = self.self_attn(self.input_layernorm(x_btd), positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq)
        x_btd = x_btd + attn
        mlp = self.mlp(self.post_attention_layernorm(x_btd))
        x_btd = constrain(x_btd + mlp, ("batch", "length", "act_embed"))
        return x_btd, {"attn": attn, "mlp": mlp, "resid": x_btd}

    def cached(self, x_btd, positions_bt, inv_freq, cache: KVCache, layer, write_pos_b, prefill: bool, fused=None):
        h, cache = self.self_attn.cached(self.input_layernorm(x_btd), positions_bt, inv_freq, cache, layer,
                                         write_pos_b, prefill, fused)
        x_btd = x_btd + h
        x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd), fused)
        return constrain(x_btd, ("batch", "length", "act_embed")), cache


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

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """Zeroed cache for `batch` rows of up to `max_len` tokens, in the compute dtype by default."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
        dtype = to_dtype(cfg.dtype) if dtype is None else dtype
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def hidden_states_cached(
        self, x_btd, positions_bt, cache: KVCache, write_pos_b, *, prefill: bool = False, unroll: bool = False,
        layer_states=None,
    ):
        """Decoder stack with a KV cache: T new tokens per row written at slots write_pos[b].. (see KVCache).

        The whole cache rides in the scan carry and each layer scatters only its new entries, so a decode step
        writes B*T entries per layer instead of copying the cache. Returns (final-norm hidden states, new cache).
        unroll: a Python loop over layers with static indices instead of the scan. In the scan each layer's weights
        are a dynamic slice that XLA (CPU) copies before use, which triples weight traffic in memory-bound decoding;
        static slices are not copied (SmolLM2-135M decode: 1.5x faster at B=1, 1.3x at B=8) but compile time grows
        with depth. layer_states: the layers' weights already split per layer as (state, fused) pairs
        (`split_layers`, outside the jitted call), used by the unrolled loop instead of slicing the stacked ones:
        XLA (CPU) materialises even a static slice, so slicing in the loop copies every weight once per step.
        """
        inv_freq = rope_inv_freq(self.cfg.dim_per_head, self.cfg.rope_theta, self.cfg.rope_scaling)
        graphdef, state = nnx.split(self.layers)
        write_pos_b = jnp.asarray(write_pos_b, jnp.int32)
        if unroll or layer_states is not None:
            for i in range(self.cfg.num_layers):
                layer_state, fused = layer_states[i] if layer_states is not None else (
                    jax.tree.map(lambda a: a[i], state), None)
                layer = nnx.merge(graphdef, layer_state)
                x_btd, cache = layer.cached(x_btd, positions_bt, inv_freq, cache, i, write_pos_b, prefill, fused)
            return self.norm(x_btd), cache

        def step(carry, xs):
            x, k_all, v_all = carry
            layer_state, i = xs
            x, new = nnx.merge(graphdef, layer_state).cached(
                x, positions_bt, inv_freq, KVCache(k_all, v_all), i, write_pos_b, prefill
            )
            return (x, new.k, new.v), None

        (x_btd, k, v), _ = jax.lax.scan(step, (x_btd, cache.k, cache.v), (state, jnp.arange(self.cfg.num_layers)))
        return self.norm(x_btd), KVCache(k, v)

    def split_layers(self, fuse: bool = False) -> tuple:
        """The stacked layer weights as one (state, fused) pair per layer, for `hidden_states_cached` (copies: 2x
        the decoder's weight memory while held). fuse: also concatenate q|k|v and gate|up into one kernel each
        (`fused`, else None) and empty those kernels in `state`, so the pair only serves `hidden_states_cached`.
        Fewer, larger matmuls: memory-bound decoding streams weights faster (SmolLM2-135M engine A/B: batch-1
        decode +16-30%, batch 8 neutral). Only without LoRA adapters on those projections (the fused path has no
        adapter)."""
        if fuse and any(getattr(getattr(self.layers, a), b).lora_a is not None
                        for paths in _FUSED.values() for a, b in paths):
            fuse = False
        return _split_layers(nnx.state(self.layers), self.cfg.num_layers, fuse)

    def hidden_states_reduced(
        self,
        x_btd,
        weights_btg,
        positions_bt=None,
        segment_ids_bt=None,
        prefix_mask_bt=None,
        parts: Sequence[str] = ("attn", "resid"),
        num_layers: int | None = None,
    ):
        """Decoder stack that also returns, for every layer, weighted sums over positions of chosen module outputs.

        parts: "attn" (attention block output after o_proj), "mlp" (MLP output), "resid" (the residual stream after
        the layer, pre final norm). weights_btg: (B, T, G) fp32 weights per group (e.g. 1/count over image and over
        text positions gives per-group means). The scan emits only (B, G, D) per layer and part, never the
        (L, B, T, D) activations. Returns (final-norm hidden states, {part: (L, B, G, D) fp32}).
        num_layers: run only the first n layers (the scan stops after the deepest layer a caller needs; the hidden
        states returned are then layer n-1's residual output, not final-normed) and L = n.
        """
        b, t, _ = x_btd.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        inv_freq = rope_inv_freq(self.cfg.dim_per_head, self.cfg.rope_theta, self.cfg.rope_scaling)
        graphdef, state = nnx.split(self.layers)
        n = self.cfg.num_layers if num_layers is None else int(num_layers)
        if not 1 <= n <= self.cfg.num_layers:
            raise ValueError(f"num_layers={num_layers} not in [1, {self.cfg.num_layers}]")
        if n < self.cfg.num_layers:
            state = jax.tree.map(lambda a: a[:n], state)
        w = weights_btg.astype(jnp.float32)

        def step(x, layer_state):
            x, outs = nnx.merge(graphdef, layer_state).with_parts(x, positions_bt, segment_ids_bt, prefix_mask_bt, inv_freq)
            red = {p: jnp.einsum("btd,btg->bgd", outs[p].astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
                   for p in parts}
            return x, red

        x_btd, stats = jax.lax.scan(step, x_btd, state)
        return (self.norm(x_btd) if n == self.cfg.num_layers else x_btd), stats

    def logits(self, h_btd: jax.Array) -> jax.Array:
        dtype = to_dtype(self.cfg.dtype)
        if self.lm_head is None:
            return jnp.einsum("btd,vd->btv", h_btd.astype(dtype), self.embed_tokens[...].astype(dtype))
        return self.lm_head(h_btd)

    def __call__(self, input_ids_bt, positions_bt=None, segment_ids_bt=None, prefix_mask_bt=None):
        return self.logits(self.hidden_states(self.embed(input_ids_bt), positions_bt, segment_ids_bt, prefix_mask_bt))
