"""Sequence log-likelihood and perplexity of a target span given image + prompt (POINTS-style filtering).

    PPL = exp(-(1/N) * sum_i log p(w_i | w_<i, image))   over the N target tokens (caption + end-of-turn)

The label log-probability is logit[label] - logsumexp(logits), with the label logit gathered by index: no one-hot
of the vocabulary is ever built. Only the positions that predict a target go through the LM head (a caption is a
fraction of its image + prompt + caption sequence; the head is ~20% of a small model's per-token work), in chunks
inside a scan, so memory is O(chunk * V) instead of O(B * S * V) (a 150k vocabulary at S=600, B=32 would
otherwise need 11 GB in fp32).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax import sharding
from vlmjax.models.vlm import embed_inputs, llm_of


@contextlib.contextmanager
def on_mesh(mesh):
    """Inside: `put(*arrays)` places host arrays for a jitted call; with a mesh, their leading (batch) axis is
    split over the data axes (replicated when they do not divide it) and the mesh's rules apply to activations."""
    if mesh is None:
        yield lambda *xs: xs
        return

    def put(*xs):
        return tuple(None if x is None else jax.device_put(x, sharding.batch_sharding(mesh, np.shape(x))) for x in xs)

    with sharding.use_mesh(mesh):
        yield put


def data_parallel(mesh) -> int:
    """Rows the mesh splits a batch into (batch sizes are padded to a multiple of it)."""
    return 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))


def _label_logprobs(llm, h_bsd, labels_bs, chunk: int):
    """log p(labels[:, s] | h[:, s]) for every s, chunked over s. Returns (B, S) fp32."""
    b, s, d = h_bsd.shape
    n = -(-s // chunk)
    pad = n * chunk - s
    h = jnp.pad(h_bsd, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
    lab = jnp.pad(labels_bs, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    def step(_, xs):
        h_bcd, lab_bc = xs
        logits = llm.logits(h_bcd).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, lab_bc[..., None], axis=-1)[..., 0]
        return None, picked - jax.nn.logsumexp(logits, axis=-1)

    _, lp = jax.lax.scan(step, None, (h, lab))
    return lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :s]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("chunk",))
def _token_logprobs(graphdef, state, ids_bs, pick_k, valid_k, pixel_values, image_rows, image_pos, segment_ids,
                    positions, *, chunk: int):
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    x_bsd = embed_inputs(model, ids_bs, pixel_values, image_rows, image_pos)
    h_bsd = llm.hidden_states(x_bsd, positions, segment_ids)
    # flat position p predicts token p + 1 (the same row: a target is never a row's first token); only the K
    # picked positions go through the LM head
    b, s, d = h_bsd.shape
    h_kd = h_bsd.reshape(b * s, d)[pick_k]
    lp = _label_logprobs(llm, h_kd[None], ids_bs.reshape(-1)[pick_k + 1][None], chunk)[0]
    out = jnp.zeros((b * s,), jnp.float32).at[pick_k + 1].add(jnp.where(valid_k, lp, 0.0))
    return out.reshape(b, s)


def target_picks(target_bs: np.ndarray, buckets: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the positions that predict a target (each target's previous position) and their validity,
    padded to a multiple of B*S / `buckets` so a run compiles at most `buckets` head sizes per batch shape."""
    flat = np.flatnonzero(target_bs) - 1
    q = max(1, -(-target_bs.size // buckets))
    k = max(1, -(-len(flat) // q)) * q
    pick, valid = np.zeros(k, np.int32), np.zeros(k, bool)
    pick[: len(flat)], valid[: len(flat)] = flat, True
    return pick, valid


def token_logprobs(model, ids_bs, target_bs, pixel_values=None, image_rows=None, *, chunk: int = 128,
                   image_pos=None, segment_ids=None, positions=None, mesh=None) -> np.ndarray:
    """(B, S) log p(token s | tokens < s, images) where target[b, s], else 0. Rows right-padded; token 0 is never
    a target. Arrays are model-layout (`image_token_id` expanded; pixel_values NHWC; image_rows, -1 = padding;
    image_pos per row for LLaVA-1.6 layouts). Packed rows (several sequences per row, as `data.packing` writes
    them): segment_ids (B, S) (0 = padding) and positions restarting at 0 per segment; the first token of a
    segment is never a target. mesh: see `on_mesh` (the model placed by `sharding.shard_module`)."""
    ids_bs, target_bs = np.asarray(ids_bs, np.int32), np.asarray(target_bs, bool)
    if target_bs[:, 0].any():
        raise ValueError("token 0 has no prefix and cannot be a target")
    if (segment_ids is None) != (positions is None):
        raise ValueError("packed rows need both segment_ids and positions")
    if segment_ids is not None:
        segment_ids, positions = np.asarray(segment_ids, np.int32), np.asarray(positions, np.int32)
        starts = np.concatenate([np.ones_like(segment_ids[:, :1], bool),
                                 segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        bad = target_bs & (starts | (segment_ids == 0))
        if bad.any():
            r, s = map(int, np.argwhere(bad)[0])
            raise ValueError(f"row {r}, token {s}: a target at a segment's first token or in padding")
    if pixel_values is not None:
        from vlmjax.models.vlm import host_image_inputs

        image_rows, image_pos = host_image_inputs(model.cfg, ids_bs, pixel_values, image_rows, image_pos)
    graphdef, state = nnx.split(model)
    pick, valid = target_picks(target_bs)
    with on_mesh(mesh) as put:
        ids_d, pixel_values, image_rows, image_pos, segment_ids, positions = put(
            ids_bs, pixel_values, image_rows, image_pos, segment_ids, positions)
        lp = _token_logprobs(graphdef, state, ids_d, pick, valid, pixel_values, image_rows, image_pos, segment_ids,
                             positions, chunk=min(chunk, len(pick)))
        return np.asarray(jax.device_get(lp))


def sequence_scores(model, ids_bs, target_bs, pixel_values=None, image_rows=None, *, chunk: int = 128,
                    image_pos=None, mesh=None) -> dict:
    """Per row: sum_logprob, num_tokens, mean_logprob and perplexity = exp(-mean_logprob) over the target."""
    lp = token_logprobs(model, ids_bs, target_bs, pixel_values, image_rows, chunk=chunk, image_pos=image_pos,
                        mesh=mesh)
    return scores_from(lp.sum(1, dtype=np.float64), np.asarray(target_bs, bool).sum(1))


def scores_from(total, n) -> dict:
    """Per-sequence scores from the summed target log-probs and the target counts (NaN mean without targets)."""
    total, n = np.asarray(total, np.float64), np.asarray(n, np.int64)
    mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return {"sum_logprob": total, "num_tokens": n, "mean_logprob": mean, "perplexity": np.exp(-mean)}


def pad_rows(rows: Sequence[Sequence[int]], targets: Sequence[np.ndarray] | None = None, *, pad_to: int = 32,
             batch_size: int | None = None):
    """Right-pad ragged rows to a multiple of `pad_to` (and `batch_size` rows) -> (ids, target mask)."""
    b = max(batch_size or len(rows), len(rows))
    s = max(1, math.ceil(max(len(r) for r in rows) / pad_to)) * pad_to
    ids = np.zeros((b, s), np.int32)
    tgt = np.zeros((b, s), bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        if targets is not None:
            tgt[i, : len(r)] = targets[i]
    return ids, tgt
