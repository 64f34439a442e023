"""Blockwise (flash) attention in pure JAX: O(S) memory on every backend, no custom kernels.

Why this exists: the reference materialises (B, H, T, S) fp32 logits, which is 2 GiB per head group at
S=8k and does not fit at S=16k. Here queries are processed one (row, q-block) at a time with an online
softmax over key blocks, and a `jax.custom_vjp` backward recomputes each tile from the saved
log-sum-exp instead of storing probabilities (FlashAttention-2 style).

Tiles the mask removes entirely are skipped twice over: the kv loop only runs between the first and last
live block of the `block_table` (causal triangle, far-away segments, trailing padding), and a `lax.cond`
inside skips dead blocks in between (non-contiguous layouts). GQA is done by grouping query heads under
their kv head (`kgqd` x `ksd`), so K/V heads are never repeated. Matmuls accumulate in fp32 and the
softmax is fp32; probabilities are cast to the value dtype before the PV matmul, as the reference does.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from vlmjax.ops.masking import MaskSpec, block_table, full_spec, pad_spec, table_bounds, tile_mask

_M_INIT = -1e30  # running max starts finite so a fully masked tile gives exp(-inf - finite) = 0, not NaN
F32 = jnp.float32


class FlashConfig(NamedTuple):
    causal: bool
    scale: float
    block_q: int
    block_k: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _q_blocks(x, nq, bq, kh):
    """(B, T, H, ...) -> (B, nq, K, G, bq, ...): one contiguous tile per (row, q-block)."""
    b, t = x.shape[:2]
    x = jnp.pad(x, [(0, 0), (0, nq * bq - t)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, nq, bq, kh, x.shape[2] // kh, *x.shape[3:])
    return jnp.moveaxis(x, 2, 4)


def _q_unblock(x, t):
    """Inverse of `_q_blocks`."""
    b, nq, kh, g, bq = x.shape[:5]
    x = jnp.moveaxis(x, 4, 2)
    return x.reshape(b, nq * bq, kh * g, *x.shape[5:])[:, :t]


def _kv_blocks(x, nk, bk):
    """(B, S, K, d) -> (B, nk, K, bk, d)."""
    b, s, kh, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, nk * bk - s), (0, 0), (0, 0)))
    return x.reshape(b, nk, bk, kh, d).transpose(0, 1, 3, 2, 4)


class _Blocked(NamedTuple):
    """Everything the loops index by (row, block), prepared once outside them."""

    q: jax.Array  # (B, nq, K, G, bq, d)
    k: jax.Array  # (B, nk, K, bk, d)
    v: jax.Array
    q_seg: jax.Array  # (B, nq, bq)
    q_pre: jax.Array
    kv_seg: jax.Array  # (B, nk, bk)
    kv_pre: jax.Array
    q_offset: jax.Array  # (B,)
    table: jax.Array  # (B, nq, nk)


def _prepare(q, k, v, spec: MaskSpec, cfg: FlashConfig) -> _Blocked:
    b, t, _, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(cfg.block_q, t), min(cfg.block_k, s)
    nq, nk = _cdiv(t, bq), _cdiv(s, bk)
    spec = pad_spec(spec, nq * bq, nk * bk)
    return _Blocked(
        _q_blocks(q, nq, bq, kh),
        _kv_blocks(k, nk, bk),
        _kv_blocks(v, nk, bk),
        spec.q_seg.reshape(b, nq, bq),
        spec.q_prefix.reshape(b, nq, bq),
        spec.kv_seg.reshape(b, nk, bk),
        spec.kv_prefix.reshape(b, nk, bk),
        spec.q_offset,
        block_table(spec, bq, bk, cfg.causal),
    )


def _logits_and_mask(blk: _Blocked, b, i, j, cfg: FlashConfig):
    """fp32 scaled logits (K, G, bq, bk) of tile (i, j) of row b, and its (bq, bk) mask."""
    bq, bk = blk.q.shape[4], blk.k.shape[3]
    qi, kj = blk.q[b, i], blk.k[b, j]
    logits = jnp.einsum("kgqd,ksd->kgqs", qi, kj, preferred_element_type=F32) * cfg.scale
    q_pos = blk.q_offset[b] + i * bq + jnp.arange(bq)
    kv_pos = j * bk + jnp.arange(bk)
    col, row = (lambda x: x[:, None]), (lambda x: x[None, :])
    mask = tile_mask(col(blk.q_seg[b, i]), row(blk.kv_seg[b, j]), col(q_pos), row(kv_pos), col(blk.q_pre[b, i]),
                     row(blk.kv_pre[b, j]), cfg.causal)
    return logits, mask


def _forward(blk: _Blocked, cfg: FlashConfig):
    """Returns blocked output (B, nq, K, G, bq, d) in fp32 and log-sum-exp (B, nq, K, G, bq)."""
    b_, nq, kh, g, bq, d = blk.q.shape
    lo, hi = table_bounds(blk.table, axis=2)

    def q_block(idx):
        b, i = idx // nq, idx % nq

        def tile(j, carry):
            def live(carry):
                m, l, acc = carry
                logits, mask = _logits_and_mask(blk, b, i, j, cfg)
                logits = jnp.where(mask, logits, -jnp.inf)
                m_new = jnp.maximum(m, logits.max(-1))
                p = jnp.exp(logits - m_new[..., None])
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("kgqs,ksd->kgqd", p.astype(blk.v.dtype), blk.v[b, j], preferred_element_type=F32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return lax.cond(blk.table[b, i, j], live, lambda c: c, carry)

        init = (jnp.full((kh, g, bq), _M_INIT, F32), jnp.zeros((kh, g, bq), F32), jnp.zeros((kh, g, bq, d), F32))
        m, l, acc = lax.fori_loop(lo[b, i], hi[b, i], tile, init)
        seen = l > 0  # rows with no visible key (padding) output 0 and get lse 0 (unused: all their p are 0)
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out, lse

    out, lse = lax.map(q_block, jnp.arange(b_ * nq))
    return out.reshape(b_, nq, kh, g, bq, d), lse.reshape(b_, nq, kh, g, bq)


def _backward(blk: _Blocked, cfg: FlashConfig, out_b, lse_b, do_b):
    """One pass over kv blocks (outer) and their live q blocks (inner); dq accumulates in a carried buffer."""
    b_, nq, kh, g, bq, d = blk.q.shape
    nk, bk = blk.k.shape[1], blk.k.shape[3]
    delta_b = jnp.sum(do_b.astype(F32) * out_b.astype(F32), -1)  # (B, nq, K, G, bq): rowsum(dO * O)
    lo, hi = table_bounds(blk.table, axis=1)
    dt = blk.v.dtype

    def kv_block(dq, idx):
        b, j = idx // nk, idx % nk
        kj, vj = blk.k[b, j], blk.v[b, j]

        def tile(i, carry):
            dq, dk, dv = carry

            def live(dk, dv):
                logits, mask = _logits_and_mask(blk, b, i, j, cfg)
                p = jnp.where(mask, jnp.exp(logits - lse_b[b, i][..., None]), 0.0)
                doi = do_b[b, i]
                dv = dv + jnp.einsum("kgqs,kgqd->ksd", p.astype(dt), doi, preferred_element_type=F32)
                dp = jnp.einsum("kgqd,ksd->kgqs", doi, vj, preferred_element_type=F32)
                ds = (p * (dp - delta_b[b, i][..., None])).astype(dt)
                dk = dk + jnp.einsum("kgqs,kgqd->ksd", ds, blk.q[b, i], preferred_element_type=F32)
                dqi = jnp.einsum("kgqs,ksd->kgqd", ds, kj, preferred_element_type=F32)
                return dk, dv, dqi

            def dead(dk, dv):
                return dk, dv, jnp.zeros((kh, g, bq, d), F32)

            dk, dv, dqi = lax.cond(blk.table[b, i, j], live, dead, dk, dv)
            # Outside the cond so the big dq buffer is updated in place, never copied through a branch.
            dq = lax.dynamic_update_slice(dq, (dq[b, i] + dqi)[None, None], (b, i, 0, 0, 0, 0))
            return dq, dk, dv

        zero = jnp.zeros((kh, bk, d), F32)
        dq, dk, dv = lax.fori_loop(lo[b, j], hi[b, j], tile, (dq, zero, zero))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(kv_block, jnp.zeros(blk.q.shape, F32), jnp.arange(b_ * nk))
    return dq * cfg.scale, dk.reshape(blk.k.shape) * cfg.scale, dv.reshape(blk.v.shape)


def _kv_unblock(x, s):
    b, nk, kh, bk, d = x.shape
    return x.transpose(0, 1, 3, 2, 4).reshape(b, nk * bk, kh, d)[:, :s]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, spec, cfg):
    return _flash_fwd(q, k, v, spec, cfg)[0]


def _flash_fwd(q, k, v, spec, cfg):
    out_b, lse_b = _forward(_prepare(q, k, v, spec, cfg), cfg)
    out_b = out_b.astype(q.dtype)
    return _q_unblock(out_b, q.shape[1]), (q, k, v, spec, out_b, lse_b)


def _flash_bwd(cfg, res, do):
    q, k, v, spec, out_b, lse_b = res
    blk = _prepare(q, k, v, spec, cfg)
    do_b = _q_blocks(do, blk.q.shape[1], blk.q.shape[4], k.shape[2])
    dq, dk, dv = _backward(blk, cfg, out_b, lse_b, do_b)
    s = k.shape[1]
    return (
        _q_unblock(dq, q.shape[1]).astype(q.dtype),
        _kv_unblock(dk, s).astype(k.dtype),
        _kv_unblock(dv, s).astype(v.dtype),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_spec(q, k, v, spec: MaskSpec, *, causal: bool, scale: float | None = None,
                         block_q: int = 128, block_k: int = 256) -> jax.Array:
    """Flash attention for an arbitrary `MaskSpec` (full attention or decode)."""
    h, kh, d = q.shape[2], k.shape[2], q.shape[3]
    if h % kh:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kh})")
    cfg = FlashConfig(bool(causal), float(d**-0.5 if scale is None else scale), int(block_q), int(block_k))
    return _flash(q, k, v, spec, cfg)


def flash_attention(q_bthd, k_bskd, v_bskd, *, segment_ids=None, causal=True, prefix_mask=None, scale=None,
                    block_q: int = 128, block_k: int = 256) -> jax.Array:
    """`attention(..., impl="xla_flash")`; same semantics as the reference, O(S) memory."""
    b, t = q_bthd.shape[:2]
    spec = full_spec(b, t, k_bskd.shape[1], segment_ids, prefix_mask, causal)
    return flash_attention_spec(q_bthd, k_bskd, v_bskd, spec, causal=causal, scale=scale,
                                block_q=block_q, block_k=block_k)
