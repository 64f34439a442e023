"""Pallas (Triton) flash attention for NVIDIA GPUs (Ampere sm80+), forward and FlashAttention-2 backward.

Why a custom kernel: XLA's fused attention (cuDNN) cannot express packed segments plus a bidirectional
prefix, and `xla_flash` pays a while-loop per tile. These kernels take the O(S) per-token mask metadata
(segment id and prefix bit packed into one int32 "code", plus positions) and rebuild each tile's mask in
registers, so every masking feature costs no extra memory traffic.

Layout: tensors stay (B, T, H, d) (strided block loads, no transposes); one program per (q-block, row,
head) forward; backward is two kernels: dq (per q-block, loops over kv) and dk/dv (per kv-block and kv
head, loops over every query head of its GQA group), so no atomics and K/V heads are never repeated.
Loop ranges come from `masking.block_table` (first..last live tile) and a `lax.cond` skips dead tiles in
between. Lengths are padded to block multiples and d to a power of two (Triton tensors must be 2^n).

Only plain `ref[...]` indexing, `lax.dot_general` and `lax.cond`/`fori_loop` are used, so the same
kernels run on CPU with `interpret=True` (how the tests check them against the reference).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vlmjax.ops.masking import MaskSpec, block_table, code_tile_mask, encode, full_spec, pad_spec, table_bounds

F32 = jnp.float32
_M_INIT = -1e30


class GpuConfig(NamedTuple):
    causal: bool
    scale: float
    block_q: int
    block_k: int
    num_warps: int
    num_stages: int
    interpret: bool


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _nt(a, b):
    """a @ b.T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def _nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def _tn(a, b):
    """a.T @ b with fp32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _tile(cfg, q, qcode, qpos, k_ref, kcode_ref, j):
    """Scaled fp32 logits (bq, bk) of q against kv block j, and the tile's mask."""
    bk = cfg.block_k
    ks = pl.ds(pl.multiple_of(j * bk, bk), bk)
    kcode = kcode_ref[ks]
    logits = _nt(q, k_ref[ks, :]) * cfg.scale
    kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    mask = code_tile_mask(qcode[:, None], qpos[:, None], kcode[None, :], kpos[None, :], cfg.causal)
    return logits, mask, ks


def _fwd_kernel(table_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, qcode_ref, qpos_ref, kcode_ref,
                o_ref, lse_ref, *, cfg: GpuConfig):
    i, b = pl.program_id(0), pl.program_id(1)
    q, qcode, qpos = q_ref[...], qcode_ref[...], qpos_ref[...]
    bq, dp = q.shape

    def body(j, carry):
        def live(carry):
            m, l, acc = carry
            logits, mask, ks = _tile(cfg, q, qcode, qpos, k_ref, kcode_ref, j)
            logits = jnp.where(mask, logits, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(logits, axis=1))
            p = jnp.exp(logits - m_new[:, None])
            alpha = jnp.exp(m - m_new)
            acc = acc * alpha[:, None] + _nn(p.astype(v_ref.dtype), v_ref[ks, :])
            return m_new, l * alpha + jnp.sum(p, axis=1), acc

        return lax.cond(table_ref[b, i, j] != 0, live, lambda c: c, carry)

    init = (jnp.full((bq,), _M_INIT, F32), jnp.zeros((bq,), F32), jnp.zeros((bq, dp), F32))
    m, l, acc = lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, init)
    seen = l > 0  # padding rows: output 0, lse 0 (never used: all their probabilities are 0)
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _dq_kernel(table_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, qcode_ref, qpos_ref, kcode_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, cfg: GpuConfig):
    i, b = pl.program_id(0), pl.program_id(1)
    q, qcode, qpos = q_ref[...], qcode_ref[...], qpos_ref[...]
    do, lse, delta = do_ref[...], lse_ref[...], delta_ref[...]

    def body(j, dq):
        def live(dq):
            logits, mask, ks = _tile(cfg, q, qcode, qpos, k_ref, kcode_ref, j)
            p = jnp.where(mask, jnp.exp(logits - lse[:, None]), 0.0)
            ds = p * (_nt(do, v_ref[ks, :]) - delta[:, None])
            return dq + _nn(ds.astype(k_ref.dtype), k_ref[ks, :])

        return lax.cond(table_ref[b, i, j] != 0, live, lambda x: x, dq)

    dq = lax.fori_loop(lo_ref[b, i], hi_ref[b, i], body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, qcode_ref, qpos_ref, kcode_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: GpuConfig, groups: int):
    """One kv block of one kv head; loops over (q block, query head in the GQA group)."""
    j, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    k, v, kcode = k_ref[...], v_ref[...], kcode_ref[...]
    kpos = j * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    lo, hi = lo_ref[b, j], hi_ref[b, j]

    def body(n, carry):
        i, h = lo + lax.div(n, groups), kh * groups + lax.rem(n, groups)

        def live(carry):
            dk, dv = carry
            qs = pl.ds(pl.multiple_of(i * bq, bq), bq)
            q, do = q_ref[b, qs, h, :], do_ref[b, qs, h, :]
            qcode, qpos = qcode_ref[b, qs], qpos_ref[b, qs]
            mask = code_tile_mask(qcode[:, None], qpos[:, None], kcode[None, :], kpos[None, :], cfg.causal)
            logits = _nt(q, k) * cfg.scale
            p = jnp.where(mask, jnp.exp(logits - lse_ref[b, h, qs][:, None]), 0.0)
            dv = dv + _tn(p.astype(do.dtype), do)
            ds = p * (_nt(do, v) - delta_ref[b, h, qs][:, None])
            dk = dk + _tn(ds.astype(q.dtype), q)
            return dk, dv

        return lax.cond(table_ref[b, i, j] != 0, live, lambda c: c, carry)

    zero = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, (hi - lo) * groups, body, (zero, zero))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


class _Prepared(NamedTuple):
    q: jax.Array  # (B, Tp, H, dp)
    k: jax.Array  # (B, Sp, K, dp)
    v: jax.Array
    qcode: jax.Array  # (B, Tp) int32: segment * 2 + prefix
    qpos: jax.Array  # (B, Tp) int32
    kcode: jax.Array  # (B, Sp) int32
    table: jax.Array  # (B, nq, nk) int32


def _prepare(q, k, v, spec: MaskSpec, cfg: GpuConfig) -> _Prepared:
    b, t, _, d = q.shape
    s = k.shape[1]
    tp, sp, dp = _cdiv(t, cfg.block_q) * cfg.block_q, _cdiv(s, cfg.block_k) * cfg.block_k, max(16, _next_pow2(d))
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))
    spec = pad_spec(spec, tp, sp)
    table = block_table(spec, cfg.block_q, cfg.block_k, cfg.causal).astype(jnp.int32)
    qcode, kcode = encode(spec.q_seg, spec.q_prefix), encode(spec.kv_seg, spec.kv_prefix)
    qpos = spec.q_offset[:, None] + jnp.arange(tp, dtype=jnp.int32)[None]
    return _Prepared(pad(q, tp), pad(k, sp), pad(v, sp), qcode, qpos, kcode, table)


def _call(kernel, grid, in_specs, out_specs, out_shape, cfg):
    from jax.experimental.pallas import triton as plgpu

    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def _whole(shape):
    """Whole-array block (the kernel indexes it itself)."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _forward(p: _Prepared, cfg: GpuConfig):
    b, tp, h, dp = p.q.shape
    sp, kh = p.k.shape[1], p.k.shape[2]
    g, bq, nq = h // kh, cfg.block_q, tp // cfg.block_q
    lo, hi = table_bounds(p.table != 0, axis=2)
    in_specs = [
        _whole(p.table.shape), _whole(lo.shape), _whole(hi.shape),
        pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
        pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
        pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
        pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
    ]
    out_shape = [jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((b, h, tp), F32)]
    call = _call(functools.partial(_fwd_kernel, cfg=cfg), (nq, b, h), in_specs, out_specs, out_shape, cfg)
    return call(p.table, lo, hi, p.q, p.k, p.v, p.qcode, p.qpos, p.kcode)


def _backward(p: _Prepared, cfg: GpuConfig, o, lse, do):
    b, tp, h, dp = p.q.shape
    sp, kh = p.k.shape[1], p.k.shape[2]
    g, bq, bk = h // kh, cfg.block_q, cfg.block_k
    nq, nk = tp // bq, sp // bk
    delta = jnp.einsum("bthd,bthd->bht", do.astype(F32), o.astype(F32))  # rowsum(dO * O), O(S)
    common = (p.table, p.q, p.k, p.v, p.qcode, p.qpos, p.kcode, do, lse, delta)

    lo, hi = table_bounds(p.table != 0, axis=2)
    dq_specs = [
        _whole(p.table.shape), _whole(lo.shape), _whole(hi.shape),
        pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, b_, h_: (b_, 0, h_ // g, 0)),
        pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
        pl.BlockSpec((None, bq), lambda i, b_, h_: (b_, i)),
        pl.BlockSpec((None, sp), lambda i, b_, h_: (b_, 0)),
        pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
        pl.BlockSpec((None, None, bq), lambda i, b_, h_: (b_, h_, i)),
    ]
    dq_out = pl.BlockSpec((None, bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0))
    dq = _call(functools.partial(_dq_kernel, cfg=cfg), (nq, b, h), dq_specs, dq_out,
               jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), cfg)(common[0], lo, hi, *common[1:])

    lo_k, hi_k = table_bounds(p.table != 0, axis=1)
    kv_block = pl.BlockSpec((None, bk, None, dp), lambda j, b_, k_: (b_, j, k_, 0))
    dkv_specs = [
        _whole(p.table.shape), _whole(lo_k.shape), _whole(hi_k.shape),
        _whole(p.q.shape), kv_block, kv_block,
        _whole(p.qcode.shape), _whole(p.qpos.shape),
        pl.BlockSpec((None, bk), lambda j, b_, k_: (b_, j)),
        _whole(do.shape), _whole(lse.shape), _whole(delta.shape),
    ]
    dk, dv = _call(functools.partial(_dkv_kernel, cfg=cfg, groups=g), (nk, b, kh), dkv_specs, [kv_block, kv_block],
                   [jax.ShapeDtypeStruct(p.k.shape, p.k.dtype)] * 2, cfg)(common[0], lo_k, hi_k, *common[1:])
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, spec, cfg):
    return _flash_fwd(q, k, v, spec, cfg)[0]


def _flash_fwd(q, k, v, spec, cfg):
    p = _prepare(q, k, v, spec, cfg)
    o, lse = _forward(p, cfg)
    t, d = q.shape[1], q.shape[3]
    return o[:, :t, :, :d], (q, k, v, spec, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, spec, o, lse = res
    p = _prepare(q, k, v, spec, cfg)
    t, s, d = q.shape[1], k.shape[1], q.shape[3]
    do = jnp.pad(do, ((0, 0), (0, o.shape[1] - t), (0, 0), (0, o.shape[3] - d)))
    dq, dk, dv = _backward(p, cfg, o, lse, do)
    return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d], None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_gpu_attention_spec(q, k, v, spec: MaskSpec, *, causal: bool, scale: float | None = None,
                              block_q: int = 64, block_k: int = 64, num_warps: int | None = None,
                              num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Triton flash attention for an arbitrary `MaskSpec`. Blocks must be powers of two >= 16."""
    h, kh, d = q.shape[2], k.shape[2], q.shape[3]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kh})")
    for blk in (block_q, block_k):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"Triton block sizes must be powers of two >= 16, got {blk}")
    if num_warps is None:
        num_warps = 4 if max(16, _next_pow2(d)) <= 64 else 8
    cfg = GpuConfig(bool(causal), float(d**-0.5 if scale is None else scale), int(block_q), int(block_k),
                    int(num_warps), int(num_stages), bool(interpret))
    return _flash(q, k, v, spec, cfg)


def pallas_gpu_attention(q_bthd, k_bskd, v_bskd, *, segment_ids=None, causal=True, prefix_mask=None,
                         scale=None, **kwargs) -> jax.Array:
    """`attention(..., impl="pallas_gpu")`; kwargs: block_q, block_k, num_warps, num_stages, interpret."""
    b, t = q_bthd.shape[:2]
    spec = full_spec(b, t, k_bskd.shape[1], segment_ids, prefix_mask, causal)
    return pallas_gpu_attention_spec(q_bthd, k_bskd, v_bskd, spec, causal=causal, scale=scale, **kwargs)
