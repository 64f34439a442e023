"""One jitted step per objective. The model is split into (graphdef, trainable, rest): gradients and optimizer
state exist only for `trainable`. A step takes k stacked micro-batches (leading axis) and accumulates their
gradients with lax.scan, so gradient accumulation is exact (one optimizer update per k micro-batches)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vlmjax.losses import cross_entropy, preference_loss, token_logprobs
from vlmjax.losses.token import segment_sums
from vlmjax.models.lora import lora_disabled, lora_dropout_key

Batch = dict[str, jax.Array]


def unembedding(model) -> jax.Array:
    """(vocab, dim) output matrix: the tied embedding or the lm_head kernel transposed."""
    llm = model.llm
    return llm.embed_tokens[...] if llm.lm_head is None else llm.lm_head.kernel[...].T


def remat_logits(loss_cfg, batch: Batch, vocab: int) -> bool:
    """loss.remat_logits: True / False, or "auto": recompute the logits in the backward pass only when keeping
    them (B x T x V fp32) would take more than loss.logits_budget_mb."""
    mode = loss_cfg.get("remat_logits", "auto")
    if mode != "auto":
        return bool(mode)
    b, t = batch["targets"].shape
    return b * t * vocab * 4 > loss_cfg.get("logits_budget_mb", 1024) * 2**20


def token_logps(model, batch: Batch, loss_cfg):
    h = model.hidden_states(batch["input_ids"], batch.get("pixel_values"), batch.get("image_rows"),
                            batch.get("positions"), batch.get("segment_ids"), image_pos=batch.get("image_pos"))
    return token_logprobs(h, unembedding(model), batch["targets"], chunk_size=loss_cfg.chunk_size,
                          remat=remat_logits(loss_cfg, batch, model.llm.cfg.vocab_size))


def sft_loss(model, batch: Batch, cfg) -> tuple[jax.Array, dict]:
    logp, lse = token_logps(model, batch, cfg.loss)
    return cross_entropy(logp, batch["loss_mask"], lse_bt=lse, z_loss=cfg.loss.z_loss, reduction=cfg.loss.reduction,
                         segment_ids_bt=batch.get("segment_ids"), max_segments=cfg.loss.max_segments)


def pair_logps(logp_bt, batch: Batch, max_segments: int):
    """Summed response log-probs and lengths per pair slot (row r, segment k): chosen rows [0,B), rejected [B,2B)."""
    mask = batch["loss_mask"].astype(jnp.float32)
    sums = segment_sums(logp_bt * mask, batch["segment_ids"], max_segments)
    lens = segment_sums(mask, batch["segment_ids"], max_segments)
    b = sums.shape[0] // 2
    flat = lambda x: x.reshape(-1)  # noqa: E731
    return flat(sums[:b]), flat(sums[b:]), flat(lens[:b]), flat(lens[b:])


def dpo_loss(model, batch: Batch, cfg, ref_model=None) -> tuple[jax.Array, dict]:
    """Policy chosen+rejected in one forward; reference with the LoRA adapter off (or a frozen copy)."""
    d, m = cfg.dpo, cfg.loss.max_segments
    logp, _ = token_logps(model, batch, cfg.loss)
    pc, pr, lc, lr = pair_logps(logp, batch, m)
    valid = ((lc > 0) & (lr > 0)).astype(jnp.float32)
    rc = rr = None
    if d.loss not in ("simpo", "orpo"):
        if d.reference == "lora_off":
            with lora_disabled():
                ref_logp, _ = token_logps(model, batch, cfg.loss)
        elif d.reference == "frozen_copy":
            ref_logp, _ = token_logps(ref_model, batch, cfg.loss)
        else:
            raise ValueError(f"dpo.reference={d.reference!r}: use lora_off or frozen_copy")
        rc, rr, _, _ = pair_logps(jax.lax.stop_gradient(ref_logp), batch, m)
    kw = dict(beta=d.beta, chosen_len=jnp.maximum(lc, 1.0), rejected_len=jnp.maximum(lr, 1.0), mask=valid)
    if d.loss == "dpo":
        kw["label_smoothing"] = d.label_smoothing
    if d.loss == "stic":
        kw["alpha"] = d.alpha
    if d.loss == "simpo":
        kw["gamma"] = d.gamma
    loss, metrics = preference_loss(d.loss, pc, pr, rc, rr, **kw)
    metrics["loss"] = loss
    metrics["tokens"] = batch["loss_mask"].sum()
    metrics["pairs"] = valid.sum()
    return loss, metrics


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg) -> Callable:
    """-> step(trainable, rest, opt_state, batches, key, ref_params=None) -> (trainable, opt_state, metrics).

    `batches` holds k micro-batches stacked on axis 0. `ref_params` (DPO with dpo.reference='frozen_copy': the
    frozen reference's values of the trainable parameters) is an argument, never a closed-over constant: a
    captured copy would be baked into the program as constants (slow constant folding, a second copy in it). Non-finite loss/grads: with train.nan_policy='skip' the
    update is dropped (metrics report it); 'stop' is enforced by the loop from the returned `finite` flag.
    """
    objective = cfg.train.objective

    def loss_fn(trainable, rest, batch, key, ref_params):
        model = nnx.merge(graphdef, trainable, rest)
        with lora_dropout_key(key):
            if objective == "sft":
                return sft_loss(model, batch, cfg)
            ref = None if ref_params is None else nnx.merge(graphdef, ref_params, rest)
            return dpo_loss(model, batch, cfg, ref)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, rest, opt_state, batches, key, ref_params=None):
        k = jax.tree.leaves(batches)[0].shape[0]
        keys = jax.random.split(key, k)
        if k == 1:  # no accumulator: saves a zero-fill, an add and a divide pass over every gradient
            (_, metrics), grads = grad_fn(trainable, rest, jax.tree.map(lambda x: x[0], batches), keys[0], ref_params)
        else:
            def micro(acc, xs):
                batch, mkey = xs
                (loss, metrics), grads = grad_fn(trainable, rest, batch, mkey, ref_params)
                acc = jax.tree.map(jnp.add, acc, grads)
                return acc, metrics

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            grads, metrics = jax.lax.scan(micro, zeros, (batches, keys))
            grads = jax.tree.map(lambda g: g / k, grads)
            metrics = jax.tree.map(jnp.mean, metrics)
            metrics["tokens"] = metrics["tokens"] * k
        gnorm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)

        def update(args):
            params, opt, grads = args
            updates, new_opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), new_opt

        # a non-finite step never touches params or optimizer state; a cond (not a select of new vs old) so a
        # finite step costs no extra pass over them
        new_params, new_opt = jax.lax.cond(finite, update, lambda args: args[:2], (trainable, opt_state, grads))
        metrics.update(grad_norm=gnorm, finite=finite)
        return new_params, new_opt, metrics

    return step


def jit_train_step(graphdef, tx: optax.GradientTransformation, cfg, trainable, opt_state):
    """`make_train_step` jitted as every caller runs it (loop, bench, AOT memory check): params and optimizer
    state donated, their output shardings pinned to those of `trainable` / `opt_state` (concrete or abstract), so
    the second call neither copies them nor recompiles."""
    shardings = jax.tree.map(lambda x: x.sharding, (trainable, opt_state))
    return jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0, 2),
                   out_shardings=(shardings[0], shardings[1], None))


def eval_loss_fn(graphdef, cfg) -> Callable:
    """-> f(trainable, rest, batch, ref_params=None) -> metrics, without gradients (held-out loss)."""

    def f(trainable, rest, batch, ref_params=None):
        model = nnx.merge(graphdef, trainable, rest)
        if cfg.train.objective == "sft":
            return sft_loss(model, batch, cfg)[1]
        ref = None if ref_params is None else nnx.merge(graphdef, ref_params, rest)
        return dpo_loss(model, batch, cfg, ref)[1]

    return f


def param_count(state: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(state))
