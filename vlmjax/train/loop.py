"""The training loop: build -> shard -> (restore) -> step/log/eval/save -> export. Config-driven (see configs/).

Resumption restores params, optimizer state, step, RNG and the data iterator state from one orbax checkpoint,
so a resumed run sees exactly the batches (and dropout masks) the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
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


def _stack(batches: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _place(batch: dict, mesh, stacked: bool = True) -> dict:
    """This host's batch (or k stacked micro-batches) -> global arrays, rows sharded over the batch mesh axes.

    Multi-host: each host holds its own rows and its own image stack; the global batch is the hosts' rows in
    process order, so each host's `image_rows` are offset by the rows before it (the model's splice does not
    care where padding slots sit)."""
    lead = (None,) if stacked else ()
    nproc, out = jax.process_count(), {}
    rows_local = batch["input_ids"].shape[len(lead)]
    for k, v in batch.items():
        if k == "image_rows" and nproc > 1:
            v = np.where(v >= 0, v + jax.process_index() * rows_local, v)
        names = lead + ("batch",) + (None,) * (v.ndim - len(lead) - 1)
        global_shape = list(v.shape)
        global_shape[len(lead)] *= nproc
        spec = shd.logical_to_spec(names, shd.DEFAULT_RULES, mesh, global_shape)
        if nproc > 1 and spec[len(lead)] is None:
            raise ValueError(f"batch key {k!r}: dim {v.shape[len(lead)]} per host cannot be split over the batch mesh "
                             "axes; make batch_size and max_images multiples of the local device count")
        out[k] = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, spec), v, tuple(global_shape))
    return out


def train(config, workdir: str, *, stop_at: int | None = None) -> dict:
    """Run (or resume) the training that `config` describes; returns a summary with the loss history.
    `stop_at` ends this process early after that step (a preemption, for tests); a rerun resumes."""
    tc = config.train
    if tc.objective not in ("sft", "dpo"):
        raise ValueError(f"train.objective={tc.objective!r}: use sft or dpo")
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
    steps = tc.steps
    tx, scheds = opt_lib.make_optimizer(config.optim, trainable, steps)
    opt_state = opt_lib.init_state(tx, trainable, mesh)  # moments sharded like their params
    key = jax.random.key(tc.seed)

    data_cfg = data_config(config.data, vcfg, tokenizer, mode=tc.objective, seed=tc.seed)
    from vlmjax.data import make_iterator

    it = make_iterator(data_cfg, tokenizer)
    eval_it = None
    if config.get("eval_data") and tc.eval_every:
        eval_it = make_iterator(data_config(config.eval_data, vcfg, tokenizer, mode=tc.objective, seed=tc.seed), tokenizer)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.save_every, keep=tc.keep_checkpoints)
    start = 0
    # step and RNG as host numpy: identical on every host, and orbax cannot save host-local jax.Arrays multi-host
    state = {"params": trainable, "opt": opt_state, "step": np.asarray(0, np.int32), "rng": np.asarray(jax.random.key_data(key))}
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, state)
        it.set_state(data_state)
        trainable, opt_state, start = state["params"], state["opt"], int(state["step"])
        key = jax.random.wrap_key_data(jnp.asarray(state["rng"]))
        log.info("resumed from step %d", start)

    step_fn = jit_train_step(graphdef, tx, config, trainable, opt_state)
    eval_fn = jax.jit(eval_loss_fn(graphdef, config)) if eval_it is not None else None
    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, steps, start, enabled=is_main)
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        log.info("trainable params %d, frozen %d", param_count(trainable), param_count(rest))
    fpt = flops_per_token(vcfg, data_cfg.seq_len)
    peak = tc.get("peak_flops_per_device", 0.0) * jax.device_count()
    history = []
    last_good = None
    try:
        for step in range(start, min(steps, stop_at or steps)):
            t0 = time.perf_counter()
            batch = _place(_stack([next(it) for _ in range(tc.grad_accum)]), mesh)
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
            history.append(m)
            writer.write(step + 1, m)
            writer.advance()
            if not finite:
                if tc.nan_policy == "stop":
                    ckpt.wait()
                    raise NonFiniteLoss(
                        f"step {step + 1}: non-finite loss/grad norm ({m['loss']}, {m['grad_norm']}); params were not "
                        f"updated; last good checkpoint: step {last_good if last_good is not None else latest}")
                log.warning("step %d: non-finite loss, update skipped", step + 1)
            state = {"params": trainable, "opt": opt_state, "step": np.asarray(step + 1, np.int32),
                     "rng": np.asarray(jax.random.key_data(key))}
            if ckpt.save(step + 1, state, it.get_state(), force=step + 1 == steps):
                last_good = step + 1
            if eval_fn is not None and (step + 1) % tc.eval_every == 0:
                em = [jax.device_get(eval_fn(trainable, rest, _place(next(eval_it), mesh, stacked=False), ref_params))
                      for _ in range(tc.get("eval_batches", 1))]
                writer.write(step + 1, {k: float(np.mean([e[k] for e in em])) for k in em[0]}, prefix="eval/")
    finally:
        ckpt.wait()
        writer.close()
        it.close()
        if eval_it is not None:
            eval_it.close()
    model = nnx.merge(graphdef, trainable, rest)
    if tc.get("save_trainable"):  # every process: the leaves are gathered across hosts
        from vlmjax.train.params_io import save_params

        save_params(trainable, os.path.join(workdir, "trainable.safetensors"))
    summary = {"steps": steps, "start": start, "history": history, "model": model, "config": vcfg, "tokenizer": tokenizer}
    if export_format:
        summary["export_dir"] = export(model, config.export_dir, tokenizer, fmt=export_format,
                                       lora=tc.get("export_lora", "merge"))
        summary["export_format"] = export_format
    return summary


def summary_json(summary: dict) -> str:
    return json.dumps({k: v for k, v in summary.items() if k in ("steps", "start", "history", "export_dir", "export_format")})
