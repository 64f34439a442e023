"""The single attention entry point every model calls.

Masking semantics (shared by every implementation, so packed VLM batches are right on every path):
  * `segment_ids` (B, S) int: tokens attend only within the same segment; segment 0 is padding and attends to
    nothing (its output is zeros, never NaN). None means one segment per row, no padding.
  * `causal`: key index <= query index (indices within the row; packed segments are contiguous so this is
    per-sample causality).
  * `prefix_mask` (B, S) bool: tokens inside a bidirectional prefix (PaliGemma-style prefix-LM, e.g. image
    tokens + prompt) also see every later prefix token of the same segment. Requires `causal`.
GQA/MQA: q has H heads, k/v have K heads with H % K == 0; K/V heads are never materialised H times.
Softmax runs in fp32 whatever the input dtype.

Implementations (`impl=`): "reference" (einsum + dense mask, O(T*S) memory: the ground truth),
"xla_flash" (blockwise, pure JAX, O(S) memory, any backend), "pallas_gpu" (Triton, sm80+),
"pallas_tpu" (Mosaic), "cudnn" (jax.nn.dot_product_attention; no segments / prefix). "auto" picks per
backend and shape (see `select_impl`) and logs its choice once per (backend, impl). Pallas impls requested
on a backend they were not written for run in interpret mode (slow; for tests).

Generation uses `decode_attention`: T new queries (the last T positions of each row) against a KV cache
whose valid length differs per row.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from vlmjax.ops import masking

log = logging.getLogger(__name__)

_NEG = -1e30  # finite, so fully masked rows give exp(0)*0 rather than NaN


def make_mask(
    q_len: int,
    kv_len: int,
    *,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    prefix_mask: jax.Array | None = None,
    batch: int = 1,
) -> jax.Array:
    """Boolean (B, T, S) mask: True where query t may attend to key s."""
    q_idx = jnp.arange(q_len)[:, None]
    k_idx = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
    if causal:
        allowed = k_idx <= q_idx
        if prefix_mask is not None:
            both_prefix = prefix_mask[:, :, None] & prefix_mask[:, None, :]
            allowed = allowed[None] | both_prefix
        mask = mask & allowed
    elif prefix_mask is not None:
        raise ValueError("prefix_mask only makes sense with causal=True")
    if segment_ids is not None:
        kv_seg = segment_ids if kv_segment_ids is None else kv_segment_ids
        same = segment_ids[:, :, None] == kv_seg[:, None, :]
        mask = mask & same & (segment_ids[:, :, None] != 0)
    return mask


def reference_attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    prefix_mask: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Plain einsum + mask: the ground truth the fused kernels are tested against. O(T*S) memory."""
    b, t, h, d = q_bthd.shape
    _, s, k, _ = k_bskd.shape
    if h % k:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({k})")
    g = h // k
    scale = d**-0.5 if scale is None else scale
    q_btkgd = q_bthd.reshape(b, t, k, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q_btkgd, k_bskd, preferred_element_type=jnp.float32) * scale
    mask_bts = make_mask(t, s, segment_ids=segment_ids, causal=causal, prefix_mask=prefix_mask, batch=b)
    logits = jnp.where(mask_bts[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1)
    # Rows with no visible key: softmax over all-_NEG is uniform; zero them explicitly.
    any_visible = mask_bts.any(-1)[:, None, None, :, None]
    probs = jnp.where(any_visible, probs, 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_bskd.dtype), v_bskd, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q_bthd.dtype)


def _dense_spec_attention(q_bthd, k_cache, v_cache, spec: masking.MaskSpec, *, causal: bool, scale=None,
                          kv_layout: str = "bskd"):
    """Reference math for an arbitrary MaskSpec (used for decoding, where T is small so O(T*S) is cheap).
    K/V in `kv_layout` ("bskd" or "bksd"); both einsums keep (b, k) leading, so a "bksd" cache is read in place
    and only the small (B, K, G, T, D) result is transposed."""
    b, t, h, d = q_bthd.shape
    k = k_cache.shape[kv_layout.index("k")]
    if h % k:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({k})")
    scale = d**-0.5 if scale is None else scale
    q = q_bthd.reshape(b, t, k, h // k, d)
    logits = jnp.einsum(f"btkgd,{kv_layout}->bkgts", q, k_cache, preferred_element_type=jnp.float32) * scale
    mask = masking.dense_mask(spec, causal)[:, None, None]
    probs = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, _NEG), axis=-1), 0.0)
    out = jnp.einsum(f"bkgts,{kv_layout}->bkgtd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q_bthd.dtype)


def _impl_fn(impl: str, *, decode: bool):
    """Lazy imports: Pallas TPU/GPU modules are only loaded when asked for."""
    if impl == "reference":
        return None
    if impl == "xla_flash":
        from vlmjax.ops import flash_xla

        return flash_xla.flash_attention_spec if decode else flash_xla.flash_attention
    if impl == "pallas_gpu":
        from vlmjax.ops import pallas_gpu

        return pallas_gpu.pallas_gpu_attention_spec if decode else pallas_gpu.pallas_gpu_attention
    if impl == "pallas_tpu":
        from vlmjax.ops import pallas_tpu

        return pallas_tpu.pallas_tpu_attention_spec if decode else pallas_tpu.pallas_tpu_attention
    if impl == "cudnn" and not decode:
        from vlmjax.ops import cudnn

        return cudnn.cudnn_attention
    names = DECODE_IMPLS if decode else IMPLS
    raise ValueError(f"unknown {'decode ' if decode else ''}attention impl {impl!r}; available: {names} or 'auto'")


IMPLS = ("reference", "xla_flash", "pallas_gpu", "pallas_tpu", "cudnn")
DECODE_IMPLS = ("reference", "xla_flash", "pallas_gpu", "pallas_tpu")
# CPU: below this many keys the dense reference is as fast (one fused einsum, tiny logits); from here on
# xla_flash wins on time and memory (bench/attention.py on 2 cores: ~2x at S=256, ~3x at S=512, for
# packed, causal and bidirectional layouts alike; at S=64 the reference is faster).
CPU_FLASH_MIN_SEQ = 256
_LOGGED: set[tuple[str, str]] = set()


def _log_once(backend: str, impl: str, why: str) -> None:
    if (backend, impl) not in _LOGGED:
        _LOGGED.add((backend, impl))
        log.info("attention: using impl=%r on backend %r (%s)", impl, backend, why)


def select_impl(q_bthd, k_bskd, *, segment_ids=None, prefix_mask=None, backend: str | None = None) -> str:
    """The `auto` policy: fastest implementation whose semantics match, per backend and shape."""
    backend = backend or jax.default_backend()
    s = k_bskd.shape[1]
    if backend == "cpu":
        return "xla_flash" if s >= CPU_FLASH_MIN_SEQ else "reference"
    if backend in ("gpu", "cuda"):
        from vlmjax.ops import cudnn

        if cudnn.supported(q_bthd, k_bskd, segment_ids=segment_ids, prefix_mask=prefix_mask):
            return "cudnn"
        cc = cudnn.gpu_compute_capability()
        return "pallas_gpu" if cc is not None and cc >= 8.0 else "xla_flash"
    if backend == "tpu":
        return "pallas_tpu"
    return "xla_flash"  # ROCm and anything else: portable, O(S) memory


def _pallas_options(impl: str, backend: str, options: dict) -> dict:
    """Pallas kernels on a backend they were not written for can only run interpreted."""
    native = {"pallas_gpu": ("gpu", "cuda"), "pallas_tpu": ("tpu",)}.get(impl)
    if native and backend not in native and "interpret" not in options:
        _log_once(backend, impl + "(interpret)", "kernel interpreted: slow, for testing")
        return {**options, "interpret": True}
    return options


def attention(
    q_bthd: jax.Array,
    k_bskd: jax.Array,
    v_bskd: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    prefix_mask: jax.Array | None = None,
    scale: float | None = None,
    impl: str = "auto",
    **options,
) -> jax.Array:
    """Dispatch to an implementation. `auto` picks the best one available for the backend and shape.

    `options` go to the implementation (e.g. block_q / block_k for xla_flash and the Pallas kernels).
    """
    backend = jax.default_backend()
    if impl == "auto":
        impl = select_impl(q_bthd, k_bskd, segment_ids=segment_ids, prefix_mask=prefix_mask, backend=backend)
        _log_once(backend, impl, "auto")
    fn = _impl_fn(impl, decode=False)
    if fn is None:
        return reference_attention(q_bthd, k_bskd, v_bskd, segment_ids=segment_ids, causal=causal,
                                   prefix_mask=prefix_mask, scale=scale, **options)
    options = _pallas_options(impl, backend, options)
    return fn(q_bthd, k_bskd, v_bskd, segment_ids=segment_ids, causal=causal, prefix_mask=prefix_mask,
              scale=scale, **options)


def decode_attention(
    q_bthd: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    kv_lengths: jax.Array,
    scale: float | None = None,
    impl: str = "auto",
    kv_layout: str = "bskd",
    **options,
) -> jax.Array:
    """Attention of T new queries against a KV cache, for generation.

    `kv_lengths` (B,) int: valid cache entries per row, already including the T new tokens, so row b's
    queries sit at positions kv_lengths[b]-T .. kv_lengths[b]-1 and query t sees keys s <= its position.
    Cache slots >= kv_lengths[b] are ignored (may hold garbage). Queries whose position is negative
    (kv_length < T) see nothing and output zeros. Equals the last T rows of causal `attention` over each
    row's first kv_lengths[b] tokens. `auto`: the dense path for short query blocks (O(T*S) memory is
    small and one fused einsum is fastest), otherwise the backend's flash kernel.
    kv_layout: "bskd" (B, S, K, D) or "bksd" (B, K, S, D), the layout the model's cache uses: the dense path's
    batched matmuls want (b, k) leading, and in "bskd" XLA copies the whole cache into that order every step
    (SmolLM2 B=8 decode over 256 slots: 19.6 -> 8.5 ms per step for 30 layers). The flash kernels take "bskd";
    a "bksd" cache is transposed for them.
    """
    if kv_layout not in ("bskd", "bksd"):
        raise ValueError(f"unknown kv_layout {kv_layout!r}; known: bskd, bksd")
    b, t = q_bthd.shape[:2]
    s = k_cache.shape[kv_layout.index("s")]
    backend = jax.default_backend()
    if impl == "auto":
        impl = "reference" if t <= 16 else select_impl(q_bthd, _as_bskd(k_cache, kv_layout), backend=backend)
        impl = "xla_flash" if impl == "cudnn" else impl
        _log_once(backend, "decode:" + impl, "auto")
    spec = masking.decode_spec(b, t, s, kv_lengths)
    fn = _impl_fn(impl, decode=True)
    if fn is None:
        return _dense_spec_attention(q_bthd, k_cache, v_cache, spec, causal=True, scale=scale, kv_layout=kv_layout,
                                     **options)
    options = _pallas_options(impl, backend, options)
    return fn(q_bthd, _as_bskd(k_cache, kv_layout), _as_bskd(v_cache, kv_layout), spec, causal=True, scale=scale,
              **options)


def _as_bskd(x, layout: str):
    return jnp.swapaxes(x, 1, 2) if layout == "bksd" else x
