"""Mask description shared by every attention kernel: per-token metadata instead of a (T, S) mask.

A dense mask costs O(T*S) memory, which is exactly what the fused kernels exist to avoid. Every kernel
instead receives O(T+S) per-token metadata (`MaskSpec`) and rebuilds the (block_q, block_k) tile it needs
with `tile_mask`. `block_table` summarises the metadata per block so kernels can skip tiles the mask
removes entirely (causal upper triangle, segments that cannot meet, padding) without ever assuming the
segment ids are sorted: the tests are only necessary conditions, so any layout stays correct, sorted
layouts (the packed-batch case) just skip more.

Rule (must equal `attention.make_mask` on the full-attention path):
    allowed(t, s) = q_seg[t] == kv_seg[s] != 0
                    and (not causal or kv_pos(s) <= q_pos(t) or (q_prefix[t] and kv_prefix[s]))
with kv_pos(s) = s and q_pos(t) = q_offset + t. q_offset is 0 for full attention and kv_length - T for
decoding against a cache, which turns "queries are the last T positions" into plain causality.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_BIG = 2**30  # sentinel for "no token" in min/max summaries; positions stay far below it


class MaskSpec(NamedTuple):
    q_seg: jax.Array  # (B, T) int32, 0 = padding / invalid query
    kv_seg: jax.Array  # (B, S) int32, 0 = padding / invalid key
    q_prefix: jax.Array  # (B, T) bool, bidirectional-prefix tokens (all False if unused)
    kv_prefix: jax.Array  # (B, S) bool
    q_offset: jax.Array  # (B,) int32, key-coordinate position of query 0


def full_spec(b: int, t: int, s: int, segment_ids=None, prefix_mask=None, causal: bool = True) -> MaskSpec:
    """MaskSpec for `attention(...)` (self-attention on a packed batch)."""
    if prefix_mask is not None and not causal:
        raise ValueError("prefix_mask only makes sense with causal=True")
    if segment_ids is None:
        if t != s and prefix_mask is not None:
            raise ValueError("prefix_mask needs q and kv of the same length")
        q_seg, kv_seg = jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32)
    else:
        if segment_ids.shape != (b, s) or t != s:
            raise ValueError(f"segment_ids must be (B, S)=({b}, {s}) with T == S, got {segment_ids.shape}, T={t}")
        q_seg = kv_seg = segment_ids.astype(jnp.int32)
    if prefix_mask is None:
        q_pre, kv_pre = jnp.zeros((b, t), bool), jnp.zeros((b, s), bool)
    else:
        q_pre = kv_pre = prefix_mask.astype(bool)
    return MaskSpec(q_seg, kv_seg, q_pre, kv_pre, jnp.zeros((b,), jnp.int32))


def decode_spec(b: int, t: int, s: int, kv_lengths) -> MaskSpec:
    """MaskSpec for T queries at positions kv_length-T .. kv_length-1 against an S-slot cache."""
    lengths = jnp.asarray(kv_lengths, jnp.int32).reshape(b)
    kv_seg = (jnp.arange(s)[None, :] < lengths[:, None]).astype(jnp.int32)
    offset = lengths - t
    q_seg = ((offset[:, None] + jnp.arange(t)[None, :]) >= 0).astype(jnp.int32)  # negative position: no key
    return MaskSpec(q_seg, kv_seg, jnp.zeros((b, t), bool), jnp.zeros((b, s), bool), offset)


def tile_mask(q_seg, kv_seg, q_pos, kv_pos, q_pre, kv_pre, causal: bool):
    """Bool tile from per-token metadata: query arrays are columns (bq, 1), key arrays rows (1, bk).

    Only broadcasting elementwise ops (no reshapes), so it lowers inside Triton and Mosaic kernels too.
    """
    ok = (q_seg == kv_seg) & (q_seg != 0)
    if causal:
        ok = ok & ((kv_pos <= q_pos) | (q_pre & kv_pre))
    return ok


def encode(seg, prefix):
    """One int32 per token for the Pallas kernels: segment * 2 + prefix bit (one load instead of two)."""
    return seg.astype(jnp.int32) * 2 + prefix.astype(jnp.int32)


def code_tile_mask(q_code, q_pos, kv_code, kv_pos, causal: bool):
    """`tile_mask` on `encode`d metadata (query column, key row)."""
    return tile_mask(q_code >> 1, kv_code >> 1, q_pos, kv_pos, (q_code & 1) == 1, (kv_code & 1) == 1, causal)


def dense_mask(spec: MaskSpec, causal: bool) -> jax.Array:
    """(B, T, S) mask from a spec; used by the plain-XLA decode path and by tests."""
    t, s = spec.q_seg.shape[1], spec.kv_seg.shape[1]
    q_pos = spec.q_offset[:, None, None] + jnp.arange(t)[None, :, None]
    kv_pos = jnp.arange(s)[None, None, :]
    col, row = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])
    return tile_mask(col(spec.q_seg), row(spec.kv_seg), q_pos, kv_pos, col(spec.q_prefix), row(spec.kv_prefix), causal)


def pad_spec(spec: MaskSpec, t_pad: int, s_pad: int) -> MaskSpec:
    """Pad to block multiples; padded tokens get segment 0 so they are masked on every path."""
    pq, pk = t_pad - spec.q_seg.shape[1], s_pad - spec.kv_seg.shape[1]
    padq = lambda x: jnp.pad(x, ((0, 0), (0, pq)))
    padk = lambda x: jnp.pad(x, ((0, 0), (0, pk)))
    return MaskSpec(padq(spec.q_seg), padk(spec.kv_seg), padq(spec.q_prefix), padk(spec.kv_prefix), spec.q_offset)


def _summ(seg, extra, n, blk):
    """min/max of nonzero segment ids per block (among tokens where `extra` holds)."""
    seg = seg.reshape(seg.shape[0], n, blk)
    live = (seg != 0) & extra.reshape(seg.shape)
    return jnp.where(live, seg, _BIG).min(-1), jnp.where(live, seg, 0).max(-1)


def block_table(spec: MaskSpec, block_q: int, block_k: int, causal: bool) -> jax.Array:
    """(B, nq, nk) bool: False only where the whole tile is masked. Spec must be padded to block multiples.

    Segment test: a live pair needs a shared nonzero id, which lies in both blocks' [min, max] ranges.
    Causal test: some live key position <= some live query position, or both blocks hold prefix tokens
    whose segment ranges meet. All tests are necessary conditions, hence conservative for any layout.
    """
    b, t = spec.q_seg.shape
    s = spec.kv_seg.shape[1]
    nq, nk = t // block_q, s // block_k
    qmin, qmax = _summ(spec.q_seg, jnp.ones_like(spec.q_prefix), nq, block_q)
    kmin, kmax = _summ(spec.kv_seg, jnp.ones_like(spec.kv_prefix), nk, block_k)
    ok = (qmin[:, :, None] <= kmax[:, None, :]) & (kmin[:, None, :] <= qmax[:, :, None])
    if causal:
        q_live = (spec.q_seg != 0).reshape(b, nq, block_q)
        q_pos = spec.q_offset[:, None, None] + jnp.arange(t).reshape(1, nq, block_q)
        q_posmax = jnp.where(q_live, q_pos, -_BIG).max(-1)
        k_live = (spec.kv_seg != 0).reshape(b, nk, block_k)
        k_posmin = jnp.where(k_live, jnp.arange(s).reshape(1, nk, block_k), _BIG).min(-1)
        below = k_posmin[:, None, :] <= q_posmax[:, :, None]
        pqmin, pqmax = _summ(spec.q_seg, spec.q_prefix, nq, block_q)
        pkmin, pkmax = _summ(spec.kv_seg, spec.kv_prefix, nk, block_k)
        prefix = (pqmin[:, :, None] <= pkmax[:, None, :]) & (pkmin[:, None, :] <= pqmax[:, :, None])
        ok = ok & (below | prefix)
    return ok


def table_bounds(table: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """First and one-past-last live index along `axis` (lo == hi when none): the loop range kernels run."""
    n = table.shape[axis]
    any_live = table.any(axis)
    lo = jnp.argmax(table, axis=axis)
    hi = n - jnp.argmax(jnp.flip(table, axis), axis=axis)
    return jnp.where(any_live, lo, 0).astype(jnp.int32), jnp.where(any_live, hi, 0).astype(jnp.int32)
