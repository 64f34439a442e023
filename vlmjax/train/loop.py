"""The training loop: build -> shard -> (restore) -> step/log/eval/save -> export. Config-driven (see configs/).

Resumption restores params, optimizer state, step, RNG and the data iterator state from one orbax checkpoint,
so a resumed run sees exactly the batches (and dropout masks) the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax import sharding as shd
from vlmjax.train import optim as opt_lib
from vlmjax.train.checkpoint import Checkpointer
from vlmjax.train.metrics import MetricsWriter
from vlmjax.train.export import export, export_plan
from vlmjax.train.setup import apply_param_dtypes, attach_lora, build_model, data_config
from vlmjax.train.step import eval_loss_fn, jit_train_step, param_count

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


def flops_per_token(cfg, seq_len: int) -> float:
    """6 x (decoder params + unembedding) + causal attention, per trained token (fwd+bwd)."""
    l = cfg.llm
    d, f, hd = l.hidden_size, l.intermediate_size, l.dim_per_head
    per_layer = d * hd * (l.num_heads * 2 + l.num_kv_heads * 2) + 3 * d * f
    dense = l.num_layers * per_layer + d * l.vocab_size
    attn = 12 * l.num_layers * l.num_heads * hd * seq_len / 2  # causal: half the score matrix on average
    return 6.0 * dense + attn


def train(config, workdir: str, *, stop_at: int | None = None) -> dict:
    """Run (or resume) the training that `config` describes; returns a summary with the loss history and the
    stage's accounting (samples, non-padding tokens, wall-clock, skipped samples by reason, why it ended).
    `stop_at` ends this process early after that step (a preemption, for tests); a rerun resumes."""
    from vlmjax.train.config_io import validate
    from vlmjax.train.workdir import check_resume, write_config

    validate(config)
    tc = config.train
    epochs = tc.get("epochs")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.save_every, keep=tc.keep_checkpoints,
                        save_first_step=tc.get("save_first_step", False))
    check_resume(workdir, config, resuming=bool(ckpt.manager.all_steps()))
    mesh = shd.make_mesh(**config.mesh.to_dict())
    rules = tuple(tuple(r) for r in config.get("sharding_rules", shd.DEFAULT_RULES))
    model, vcfg, tokenizer = build_model(config.model, image=config.data.get("image"))
    export_format = export_plan(config, vcfg)  # before step 1: a model that cannot be exported fails now
    attach_lora(model, config.lora, tc.seed)
    apply_param_dtypes(model, config.model, tuple(tc.trainable))  # model.frozen_param_dtype (setup.py)
    if config.model.get("load_params"):
        from vlmjax.train.params_io import load_params

        log.info("loaded %d tensors from %s", load_params(model, config.model.load_params), config.model.load_params)
    shd.shard_module(model, mesh, rules)
    graphdef, trainable, rest = opt_lib.split_trainable(model, tuple(tc.trainable))
    ref_params = None
    if tc.objective == "dpo" and config.dpo.reference == "frozen_copy":
        ref_params = jax.tree.map(jnp.copy, trainable)

    data_cfg = data_config(config.data, vcfg, tokenizer, mode=tc.objective, seed=tc.seed)
    if epochs:
        data_cfg = dataclasses.replace(data_cfg, num_epochs=epochs)
    from vlmjax.data import make_iterator

    it = make_iterator(data_cfg, tokenizer)
    steps = tc.steps
    if epochs:  # the schedule spans the data: exact without packing (and skips), an upper bound with packing
        records = _max_over_hosts(it.records)
        steps = max(1, math.ceil(records / (data_cfg.batch_size * tc.grad_accum)))
        log.info("train.epochs=%d: %d records on this host's shard -> at most %d steps (train.steps=%d ignored)",
                 epochs, it.records, steps, tc.steps)
    tx, scheds = opt_lib.make_optimizer(config.optim, trainable, steps)
    opt_state = opt_lib.init_state(tx, trainable, mesh)  # moments sharded like their params
    key = jax.random.key(tc.seed)
    eval_it = None
    if config.get("eval_data") and tc.eval_every:
        eval_it = make_iterator(data_config(config.eval_data, vcfg, tokenizer, mode=tc.objective, seed=tc.seed), tokenizer)

    start = 0
    progress = {"tokens": 0, "wall_s": 0.0}
    # step and RNG as host numpy: identical on every host, and orbax cannot save host-local jax.Arrays multi-host
    state = {"params": trainable, "opt": opt_state, "step": np.asarray(0, np.int32), "rng": np.asarray(jax.random.key_data(key))}
    restored = ckpt.restore_latest(state)
    if restored is not None:
        _, state, data_state = restored
        progress.update(data_state.pop("trainer", {}))
        it.set_state(data_state)
        trainable, opt_state, start = state["params"], state["opt"], int(state["step"])
        key = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
        log.info("resumed from step %d", start)

    step_fn = jit_train_step(graphdef, tx, config, trainable, opt_state)
    eval_fn = jax.jit(eval_loss_fn(graphdef, config)) if eval_it is not None else None
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, steps, start, enabled=is_main)
    if is_main:
        write_config(workdir, config)
        log.info("trainable params %d, frozen %d", param_count(trainable), param_count(rest))
    fpt = flops_per_token(vcfg, data_cfg.seq_len)
    peak = tc.get("peak_flops_per_device", 0.0) * jax.device_count()
    max_skips = tc.get("max_consecutive_skips", 10)
    finite_data = it.records is not None
    history, end, step, streak = [], "steps", start, 0
    last_saved = start if restored is not None else None
    t_session = time.perf_counter()
    wall0 = progress["wall_s"]
    try:
        for step in range(start, min(steps, stop_at or steps)):
            t0 = time.perf_counter()
            micro = _next_batches(it, tc.grad_accum)
            if finite_data and not _all_hosts(bool(micro)):
                end = "data"
                break
            progress["tokens"] += int(sum((b["segment_ids"] > 0).sum() for b in micro))
            batch = shd.place_batch(shd.stack_batches(_pad_accum(micro, tc.grad_accum)), mesh, rules)
            key, sub = jax.random.split(key)
            with shd.use_mesh(mesh, rules):
                trainable, opt_state, metrics = step_fn(trainable, rest, opt_state, batch, sub, ref_params)
            metrics = jax.device_get(metrics)  # blocks: one step at a time (also keeps CPU collectives safe)
            dt = time.perf_counter() - t0
            finite = bool(metrics.pop("finite"))
            m = {k: float(v) for k, v in metrics.items()}
            m["lr"] = float(scheds["default"](step))
            m["step_time_s"] = dt
            m["tokens_per_s"] = m["tokens"] / dt
            if peak:
                m["mfu"] = m["tokens"] * fpt / dt / peak
            m.update(_data_metrics(it.stats, progress["tokens"]))
            history.append(m)
            writer.write(step + 1, m)
            writer.advance()
            progress["wall_s"] = wall0 + time.perf_counter() - t_session
            streak = 0 if finite else streak + 1
            if not finite:
                good = f"last good checkpoint: step {last_saved}" if last_saved is not None else "no checkpoint yet"
                if tc.nan_policy == "stop":
                    ckpt.wait()
                    raise NonFiniteLoss(
                        f"step {step + 1}: non-finite loss/grad norm ({m['loss']}, {m['grad_norm']}); params were not "
                        f"updated; {good}")
                if streak >= max_skips:
                    ckpt.wait()
                    raise NonFiniteLoss(
                        f"step {step + 1}: {streak} non-finite steps in a row (train.max_consecutive_skips="
                        f"{max_skips}); stopping: the model or learning rate is broken, not one batch; {good}")
                log.warning("step %d: non-finite loss, update skipped (%d in a row)", step + 1, streak)
            state = {"params": trainable, "opt": opt_state, "step": np.asarray(step + 1, np.int32),
                     "rng": np.asarray(jax.random.key_data(key))}
            # never save a state whose last step was non-finite: a resume would replay the same failure
            if streak == 0 and _save(ckpt, step + 1, state, it, progress, force=step + 1 == steps):
                last_saved = step + 1
            if eval_fn is not None and (step + 1) % tc.eval_every == 0:
                em = [jax.device_get(eval_fn(trainable, rest, shd.place_batch(next(eval_it), mesh, rules, stacked=False), ref_params))
                      for _ in range(tc.get("eval_batches", 1))]
                writer.write(step + 1, {k: float(np.mean([e[k] for e in em])) for k in em[0]}, prefix="eval/")
        else:
            step = min(steps, stop_at or steps)
            end = "stop_at" if step < steps else "data" if epochs else "steps"  # epochs: steps bound the data
        if end == "data":
            log.info("end of the data after step %d (%s)", step,
                     f"train.epochs={epochs}" if epochs else f"data.num_epochs={data_cfg.num_epochs}")
            if streak == 0 and step > start and last_saved != step:
                state = {"params": trainable, "opt": opt_state, "step": np.asarray(step, np.int32),
                         "rng": np.asarray(jax.random.key_data(key))}
                if _save(ckpt, step, state, it, progress, force=True):
                    last_saved = step
        elif streak:
            log.warning("run ended on %d non-finite step(s); the last saved state is step %s", streak, last_saved)
    finally:
        ckpt.wait()
        writer.close()
        it.close()
        if eval_it is not None:
            eval_it.close()
    stats = it.stats
    seen = stats.used + stats.num_skipped
    if is_main and stats.num_skipped:
        log.warning("skipped %d of %d samples (%.2f%%) by reason: %s", stats.num_skipped, seen,
                    100.0 * stats.num_skipped / max(seen, 1), dict(stats.skipped))
    summary = {"steps": steps, "start": start, "end": end, "last_step": step, "last_checkpoint": last_saved,
               "samples_seen": stats.used, "tokens_seen": progress["tokens"], "wall_s": progress["wall_s"],
               "skipped": dict(stats.skipped), "history": history, "model": None, "config": vcfg,
               "tokenizer": tokenizer}
    policy = data_cfg.bad_samples
    if policy.on_bad_sample == "skip" and stats.num_skipped > policy.max_skip_fraction * seen:
        from vlmjax.data.errors import TooManySkipped

        # short runs never reach min_samples: the cap is checked again over the whole run, before any export
        raise TooManySkipped(f"{stats.num_skipped} of {seen} samples skipped (> {policy.max_skip_fraction:.1%}) "
                             f"over the run: {dict(stats.skipped)}. Fix the data or raise "
                             "data.bad_samples.max_skip_fraction. Checkpoints are kept; nothing was exported.")
    model = nnx.merge(graphdef, trainable, rest)
    summary["model"] = model
    if tc.get("save_trainable"):  # every process: the leaves are gathered across hosts
        from vlmjax.train.params_io import save_params

        save_params(trainable, os.path.join(workdir, "trainable.safetensors"))
    if export_format:
        summary["export_dir"] = export(model, config.export_dir, tokenizer, fmt=export_format,
                                       lora=tc.get("export_lora", "merge"))
        summary["export_format"] = export_format
    return summary


def _save(ckpt: Checkpointer, step: int, state: dict, it, progress: dict, *, force: bool) -> bool:
    """Save unless a parameter or moment is non-finite (a finite loss can still come with overflowed params)."""
    if not (force or ckpt.save_every and step % ckpt.save_every == 0 or (ckpt.save_first_step and step == 1)):
        return False
    if not bool(_all_finite((state["params"], state["opt"]))):
        log.warning("step %d: parameters or optimizer state are non-finite; not saved", step)
        return False
    return ckpt.save(step, state, {**it.get_state(), "trainer": dict(progress)}, force=force)


@jax.jit
def _all_finite(tree) -> jax.Array:
    """One replicated bool (readable on every host) for all float leaves."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.asarray(True)


def _next_batches(it, k: int) -> list[dict]:
    """Up to k batches; fewer (or none) at the end of the data."""
    out = []
    for _ in range(k):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _pad_accum(micro: list[dict], k: int) -> list[dict]:
    """The last step of finite data may have fewer than grad_accum micro-batches: fill with copies that train no
    token (loss_mask 0), so the jitted step keeps its shape and the missing ones add no gradient."""
    if len(micro) == k:
        return micro
    pad = {**micro[-1], "loss_mask": np.zeros_like(micro[-1]["loss_mask"])}
    return micro + [pad] * (k - len(micro))


def _all_hosts(flag: bool) -> bool:
    """True when every host has it (hosts' shards can end a step apart)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _max_over_hosts(n: int) -> int:
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def _data_metrics(stats, tokens: int) -> dict:
    m = {"data/samples": stats.used, "data/tokens": tokens, "data/skipped": stats.num_skipped}
    m.update({f"data/skipped/{r}": n for r, n in stats.skipped.items()})
    return m


def summary_json(summary: dict) -> str:
    keys = ("steps", "start", "end", "last_step", "last_checkpoint", "samples_seen", "tokens_seen", "wall_s", "skipped",
            "history", "export_dir", "export_format")
    out = {k: v for k, v in summary.items() if k in keys}
    out["history"] = [{k: v if math.isfinite(v) else None for k, v in h.items()} for h in out.get("history", [])]
    return json.dumps(out, allow_nan=False)
