"""Token-level losses on hidden states, computed in sequence chunks.

The full fp32 logits of a batch (B x S x V, e.g. 8 x 2048 x 128k x 4 bytes = 8 GiB) are never materialised:
each chunk's logits are formed, reduced to (log p of the target, logsumexp) and dropped; `jax.checkpoint`
makes the backward pass recompute them per chunk. The target logit is gathered, never a one-hot of the vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(
    h_btd: jax.Array, w_vd: jax.Array, targets_bt: jax.Array, *, chunk_size: int = 256, remat: bool = True
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and logsumexp per position, in fp32. `w_vd` is the unembedding (vocab, dim).

    remat=False keeps each chunk's logits for the backward pass instead of recomputing them: one vocab matmul
    less per step (~7% of a SmolLM2-135M step) for B x T x V x 4 bytes held (`logits_fit` decides in the trainer)."""
    b, t, d = h_btd.shape
    c = min(chunk_size, t)
    pad = (-t) % c
    if pad:
        h_btd = jnp.pad(h_btd, ((0, 0), (0, pad), (0, 0)))
        targets_bt = jnp.pad(targets_bt, ((0, 0), (0, pad)))
    n = (t + pad) // c
    h_nbcd = h_btd.reshape(b, n, c, d).swapaxes(0, 1)
    y_nbc = targets_bt.reshape(b, n, c).swapaxes(0, 1)

    def chunk(h_bcd, y_bc):
        logits = jnp.einsum("bcd,vd->bcv", h_bcd, w_vd.astype(h_bcd.dtype), preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y_bc[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return picked - lse, lse

    if remat:
        chunk = jax.checkpoint(chunk)
    logp_nbc, lse_nbc = jax.lax.map(lambda args: chunk(*args), (h_nbcd, y_nbc))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * c)[:, :t]  # noqa: E731
    return unchunk(logp_nbc), unchunk(lse_nbc)


def segment_sums(x_bt: jax.Array, segment_ids_bt: jax.Array, max_segments: int) -> jax.Array:
    """(B, T) -> (B, max_segments): sums per packed segment id 1..max_segments (0 = padding is dropped)."""
    onehot_bts = jax.nn.one_hot(segment_ids_bt - 1, max_segments, dtype=x_bt.dtype)  # -1 -> all zeros
    return jnp.einsum("bt,bts->bs", x_bt, onehot_bts)


def cross_entropy(
    logp_bt: jax.Array,
    loss_mask_bt: jax.Array,
    *,
    lse_bt: jax.Array | None = None,
    z_loss: float = 0.0,
    reduction: str = "token",
    segment_ids_bt: jax.Array | None = None,
    max_segments: int = 64,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked NLL. reduction='token': mean over all trained tokens of the batch; 'sequence': mean over samples of
    each sample's mean (samples = packed segments if `segment_ids_bt` is given, else rows).
    z_loss adds z_loss * mean(lse^2) over trained tokens (PaLM) to keep the softmax normaliser near 0."""
    mask = loss_mask_bt.astype(jnp.float32)
    n_tok = mask.sum()
    nll_bt = -logp_bt * mask
    if reduction == "token":
        loss = nll_bt.sum() / jnp.maximum(n_tok, 1.0)
    elif reduction == "sequence":
        if segment_ids_bt is None:
            per_seq, counts = nll_bt.sum(-1), mask.sum(-1)
        else:
            per_seq, counts = segment_sums(nll_bt, segment_ids_bt, max_segments), segment_sums(mask, segment_ids_bt, max_segments)
        has = counts > 0
        loss = jnp.where(has, per_seq / jnp.maximum(counts, 1.0), 0.0).sum() / jnp.maximum(has.sum(), 1)
    else:
        raise ValueError(f"unknown reduction {reduction!r} (token | sequence)")
    metrics = {"nll": nll_bt.sum() / jnp.maximum(n_tok, 1.0), "tokens": n_tok}
    if z_loss:
        if lse_bt is None:
            raise ValueError("z_loss needs lse_bt")
        zl = (jnp.square(lse_bt) * mask).sum() / jnp.maximum(n_tok, 1.0)
        loss = loss + z_loss * zl
        metrics["z_loss"] = zl
    metrics["loss"] = loss
    return loss, metrics


def sequence_logprobs(logp_bt: jax.Array, loss_mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row summed log-prob of the trained span and its token count (preferences, perplexity)."""
    mask = loss_mask_bt.astype(jnp.float32)
    return (logp_bt * mask).sum(-1), mask.sum(-1)
