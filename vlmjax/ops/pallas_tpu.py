"""Pallas (Mosaic) flash attention for TPU: forward plus FlashAttention-2 style dq and dk/dv kernels.

Why our own kernel rather than `splash_attention`: splash masks are static numpy objects, but a VLM batch
has a different prefix (image tokens + prompt) in every row, so "causal OR same-segment prefix" cannot
be encoded without recompiling per batch. Here the mask is rebuilt per tile from O(S) metadata (one
int32 code per token = segment * 2 + prefix bit, plus query positions), exactly as on the GPU path.

TPU shape rules drive the layout: tensors are transposed to (B, H, T, d) so tiles are (rows, d); query
metadata is a (bq, 1) column and key metadata a (1, bk) row so the (bq, bk) tile mask is a broadcast.
The kv axis is the innermost "arbitrary" grid axis with VMEM accumulators. The per-tile liveness table
from `masking.block_table` is scalar-prefetched into SMEM: dead tiles are skipped with `pl.when`, and the
k/v index maps clamp to the live range so leading/trailing dead tiles trigger no new DMA.
Block sizes must be multiples of 128 on hardware; tests run it on CPU under the Pallas interpreter and the
TPU simulator (`pltpu.InterpretParams`), and lower it to Mosaic for a v5e.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vlmjax.ops.masking import MaskSpec, block_table, code_tile_mask, encode, full_spec, pad_spec, table_bounds

F32 = jnp.float32
_M_INIT = -1e30


class TpuConfig(NamedTuple):
    causal: bool
    scale: float
    block_q: int
    block_k: int
    interpret: object  # False, True (generic Pallas interpreter) or pltpu.InterpretParams (TPU simulator)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot(a, b, ca, cb):
    return lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=F32)


def _mask(cfg, qcode, qpos, kcode, j):
    """(bq, bk) mask from a (bq, 1) query column and a (1, bk) key row: 2-D broadcasts only (Mosaic)."""
    kpos = j * cfg.block_k + lax.broadcasted_iota(jnp.int32, kcode.shape, 1)
    return code_tile_mask(qcode, qpos, kcode, kpos, cfg.causal)


def _fwd_kernel(table_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, qcode_ref, qpos_ref, kcode_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, cfg: TpuConfig, nq: int, nk: int):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, _M_INIT, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(table_ref[(b * nq + i) * nk + j] != 0)
    def _():
        logits = _dot(q_ref[...], k_ref[...], 1, 1) * cfg.scale
        mask = _mask(cfg, qcode_ref[...], qpos_ref[...], kcode_ref[...], j)
        logits = jnp.where(mask, logits, -jnp.inf)
        m = m_sc[...]
        m_new = jnp.maximum(m, logits.max(axis=1, keepdims=True))
        p = jnp.exp(logits - m_new)
        alpha = jnp.exp(m - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...], 1, 0)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _():
        l = l_sc[...]
        seen = l > 0  # padding rows: output 0 and lse 0 (unused: their probabilities are all 0)
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), 0.0)


def _dq_kernel(table_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, qcode_ref, qpos_ref, kcode_ref,
               do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *, cfg: TpuConfig, nq: int, nk: int):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, F32)

    @pl.when(table_ref[(b * nq + i) * nk + j] != 0)
    def _():
        logits = _dot(q_ref[...], k_ref[...], 1, 1) * cfg.scale
        mask = _mask(cfg, qcode_ref[...], qpos_ref[...], kcode_ref[...], j)
        p = jnp.where(mask, jnp.exp(logits - lse_ref[...]), 0.0)
        ds = p * (_dot(do_ref[...], v_ref[...], 1, 1) - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k_ref.dtype), k_ref[...], 1, 0)

    @pl.when(j == nk - 1)
    def _():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(table_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, qcode_ref, qpos_ref, kcode_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: TpuConfig, nq: int, nk: int):
    """Grid (B, K, nk, G, nq): the two innermost axes walk every query head of the group and every q block."""
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, F32)

    @pl.when(table_ref[(b * nq + i) * nk + j] != 0)
    def _():
        q, do = q_ref[...], do_ref[...]
        logits = _dot(q, k_ref[...], 1, 1) * cfg.scale
        mask = _mask(cfg, qcode_ref[...], qpos_ref[...], kcode_ref[...], j)
        p = jnp.where(mask, jnp.exp(logits - lse_ref[...]), 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, 0, 0)
        ds = p * (_dot(do, v_ref[...], 1, 1) - delta_ref[...])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, 0, 0)

    @pl.when((g == pl.num_programs(3) - 1) & (i == nq - 1))
    def _():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


class _Prepared(NamedTuple):
    q: jax.Array  # (B, H, Tp, d)
    k: jax.Array  # (B, K, Sp, d)
    v: jax.Array
    qcode: jax.Array  # (B, Tp, 1) int32: segment * 2 + prefix
    qpos: jax.Array  # (B, Tp, 1) int32
    kcode: jax.Array  # (B, 1, Sp) int32
    table: jax.Array  # (B * nq * nk,) int32, flat for SMEM
    lo: jax.Array  # (B * nq,) first live kv block per q block
    hi: jax.Array  # (B * nq,) one past the last
    lo_k: jax.Array  # (B * nk,) first live q block per kv block (dk/dv kernel)
    hi_k: jax.Array


def _prepare(q, k, v, spec: MaskSpec, cfg: TpuConfig) -> _Prepared:
    t, s = q.shape[1], k.shape[1]
    tp, sp = _cdiv(t, cfg.block_q) * cfg.block_q, _cdiv(s, cfg.block_k) * cfg.block_k
    tr = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    spec = pad_spec(spec, tp, sp)
    table = block_table(spec, cfg.block_q, cfg.block_k, cfg.causal)
    lo, hi = table_bounds(table, axis=2)
    lo_k, hi_k = table_bounds(table, axis=1)
    qcode = encode(spec.q_seg, spec.q_prefix)[:, :, None]
    kcode = encode(spec.kv_seg, spec.kv_prefix)[:, None, :]
    qpos = (spec.q_offset[:, None] + jnp.arange(tp, dtype=jnp.int32)[None])[:, :, None]
    return _Prepared(tr(q, tp), tr(k, sp), tr(v, sp), qcode, qpos, kcode, table.astype(jnp.int32).reshape(-1),
                     lo.reshape(-1), hi.reshape(-1), lo_k.reshape(-1), hi_k.reshape(-1))


def _kv_side_specs(nq: int, g: int, bk: int, d: int):
    """k / v / kcode blocks for grids (b, h, i, j): j is clamped into the live range of q block (b, i), so
    leading and trailing dead tiles map to an already-resident block and trigger no DMA."""

    def live_j(b, i, j, lo, hi):
        r = b * nq + i
        return jnp.clip(j, lo[r], jnp.maximum(hi[r] - 1, lo[r]))

    kv = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, _, lo, hi: (b, h // g, live_j(b, i, j, lo, hi), 0))
    kcode = pl.BlockSpec((None, 1, bk), lambda b, h, i, j, _, lo, hi: (b, 0, live_j(b, i, j, lo, hi)))
    return [kv, kv, kcode]


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, cfg, semantics):
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=cfg.interpret,
    )


def _q_side_specs(bq: int, d: int):
    """q / qcode / qpos blocks for grids (b, h, i, j)."""
    return [
        pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
        pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
        pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
    ]


def _forward(p: _Prepared, cfg: TpuConfig):
    b, h, tp, d = p.q.shape
    kh, sp = p.k.shape[1], p.k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk, g = tp // bq, sp // bk, h // kh
    qs, qcode_s, qpos_s = _q_side_specs(bq, d)
    k_s, v_s, kcode_s = _kv_side_specs(nq, g, bk, d)
    in_specs = [qs, k_s, v_s, qcode_s, qpos_s, kcode_s]
    out_specs = [qs, pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j, *_: (b_, h_, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), jax.ShapeDtypeStruct((b, h, tp, 1), F32)]
    scratch = [pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, 1), F32), pltpu.VMEM((bq, d), F32)]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk)
    call = _call(kernel, (b, h, nq, nk), in_specs, out_specs, out_shape, scratch, cfg,
                 ("parallel", "parallel", "parallel", "arbitrary"))
    return call(p.table, p.lo, p.hi, p.q, p.k, p.v, p.qcode, p.qpos, p.kcode)


def _backward(p: _Prepared, cfg: TpuConfig, o, lse, do):
    b, h, tp, d = p.q.shape
    kh, sp = p.k.shape[1], p.k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk, g = tp // bq, sp // bk, h // kh
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1, keepdims=True)  # (B, H, Tp, 1)
    args = (p.table, p.lo, p.hi, p.q, p.k, p.v, p.qcode, p.qpos, p.kcode, do, lse, delta)

    qs, qcode_s, qpos_s = _q_side_specs(bq, d)
    k_s, v_s, kcode_s = _kv_side_specs(nq, g, bk, d)
    row = pl.BlockSpec((None, None, bq, 1), lambda b_, h_, i, j, *_: (b_, h_, i, 0))
    dq_specs = [qs, k_s, v_s, qcode_s, qpos_s, kcode_s, qs, row, row]
    dq = _call(functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk), (b, h, nq, nk), dq_specs, qs,
               jax.ShapeDtypeStruct(p.q.shape, p.q.dtype), [pltpu.VMEM((bq, d), F32)], cfg,
               ("parallel", "parallel", "parallel", "arbitrary"))(*args)

    # dk/dv grid (b, kv head, kv block, group member, q block): query head = kv head * G + member; the q
    # block index is clamped to this kv block's live range (dead tiles re-use the previous DMA).
    def live_i(b_, j, i, lo, hi):
        r = b_ * nk + j
        return jnp.clip(i, lo[r], jnp.maximum(hi[r] - 1, lo[r]))

    q_blk = lambda b_, k_, j, m, i, _, lo, hi: (b_, k_ * g + m, live_i(b_, j, i, lo, hi), 0)
    q_meta = lambda b_, k_, j, m, i, _, lo, hi: (b_, live_i(b_, j, i, lo, hi), 0)
    kvb = pl.BlockSpec((None, None, bk, d), lambda b_, k_, j, m, i, *_: (b_, k_, j, 0))
    dkv_specs = [pl.BlockSpec((None, None, bq, d), q_blk), kvb, kvb,
                 pl.BlockSpec((None, bq, 1), q_meta), pl.BlockSpec((None, bq, 1), q_meta),
                 pl.BlockSpec((None, 1, bk), lambda b_, k_, j, m, i, *_: (b_, 0, j)),
                 pl.BlockSpec((None, None, bq, d), q_blk),
                 pl.BlockSpec((None, None, bq, 1), q_blk), pl.BlockSpec((None, None, bq, 1), q_blk)]
    dkv = _call(functools.partial(_dkv_kernel, cfg=cfg, nq=nq, nk=nk), (b, kh, nk, g, nq), dkv_specs,
                [kvb, kvb], [jax.ShapeDtypeStruct(p.k.shape, p.k.dtype)] * 2,
                [pltpu.VMEM((bk, d), F32), pltpu.VMEM((bk, d), F32)], cfg,
                ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"))
    dk, dv = dkv(p.table, p.lo_k, p.hi_k, *args[3:])
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, spec, cfg):
    return _flash_fwd(q, k, v, spec, cfg)[0]


def _flash_fwd(q, k, v, spec, cfg):
    o, lse = _forward(_prepare(q, k, v, spec, cfg), cfg)
    return o.transpose(0, 2, 1, 3)[:, : q.shape[1]], (q, k, v, spec, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, spec, o, lse = res
    t, s = q.shape[1], k.shape[1]
    do = jnp.pad(do, ((0, 0), (0, o.shape[2] - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    dq, dk, dv = _backward(_prepare(q, k, v, spec, cfg), cfg, o, lse, do)
    back = lambda x, n: x.transpose(0, 2, 1, 3)[:, :n]
    return back(dq, t), back(dk, s), back(dv, s), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def pallas_tpu_attention_spec(q, k, v, spec: MaskSpec, *, causal: bool, scale: float | None = None,
                              block_q: int = 512, block_k: int = 512, interpret=False) -> jax.Array:
    """TPU flash attention for an arbitrary `MaskSpec`. On hardware use blocks that are multiples of 128.

    interpret: True runs the generic Pallas interpreter (fast, any backend); a `pltpu.InterpretParams()`
    runs the TPU simulator (models VMEM/DMA/semaphores; slower).
    """
    h, kh, d = q.shape[2], k.shape[2], q.shape[3]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kh})")
    t, s = q.shape[1], k.shape[1]
    # Short inputs: one block covering the (8-row aligned) whole sequence instead of mostly-padding tiles.
    block_q = min(block_q, _cdiv(t, 8) * 8)
    block_k = min(block_k, _cdiv(s, 128) * 128) if not interpret else min(block_k, _cdiv(s, 8) * 8)
    cfg = TpuConfig(bool(causal), float(d**-0.5 if scale is None else scale), int(block_q), int(block_k), interpret)
    return _flash(q, k, v, spec, cfg)


def pallas_tpu_attention(q_bthd, k_bskd, v_bskd, *, segment_ids=None, causal=True, prefix_mask=None,
                         scale=None, **kwargs) -> jax.Array:
    """`attention(..., impl="pallas_tpu")`; kwargs: block_q, block_k, interpret."""
    b, t = q_bthd.shape[:2]
    spec = full_spec(b, t, k_bskd.shape[1], segment_ids, prefix_mask, causal)
    return pallas_tpu_attention_spec(q_bthd, k_bskd, v_bskd, spec, causal=causal, scale=scale, **kwargs)
