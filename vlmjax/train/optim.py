"""What trains, and how: regex rules over parameter paths -> groups with their own learning rates.

`config.train.trainable` lists regexes over '/'-joined param paths (e.g. 'projector/.*', 'llm/.*lora_'); every
other parameter is frozen: excluded from gradients and from the optimizer state entirely. Optional
`config.optim.groups` give some trainable params another peak lr (STIC: LoRA 1e-7, projector 2e-5).
All schedules, AdamW, clipping come from optax.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import optax
from flax import nnx


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def regex_filter(patterns: Sequence[str]):
    """An nnx filter: Params whose path matches any pattern (re.search)."""
    compiled = [re.compile(p) for p in patterns]

    def f(path, value) -> bool:
        return isinstance(value, nnx.Param) and any(c.search(path_str(path)) for c in compiled)

    return f


def split_trainable(model: nnx.Module, patterns: Sequence[str]):
    """-> graphdef, trainable State, rest State. Errors if nothing matches (a typo would train nothing)."""
    graphdef, trainable, rest = nnx.split(model, regex_filter(patterns), ...)
    if not nnx.to_flat_state(trainable):
        names = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))][:8]
        raise ValueError(f"train.trainable={list(patterns)} matches no parameter; paths look like {names}")
    return graphdef, trainable, rest


def schedule(peak_lr: float, total_steps: int, *, kind: str, warmup_steps: int, end_factor: float = 0.0):
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay = max(1, total_steps - warmup_steps)
    if kind == "cosine":
        # optax needs a cosine part of >= 1 step after the (>= 1 step) warmup: a 1-step run has none otherwise
        return optax.warmup_cosine_decay_schedule(0.0, peak_lr, max(warmup_steps, 1),
                                                  max(warmup_steps + decay, max(warmup_steps, 1) + 1),
                                                  end_value=peak_lr * end_factor)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1)),
             optax.linear_schedule(peak_lr, peak_lr * end_factor, decay)], [warmup_steps])
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1)),
                                     optax.constant_schedule(peak_lr)], [warmup_steps])
    raise ValueError(f"unknown schedule {kind!r} (cosine | linear | constant)")


def make_optimizer(optim_cfg, trainable: nnx.State, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """AdamW per lr group (+ global-norm clipping). Returns the transform and {group: lr schedule} for logging."""
    warmup = optim_cfg.get("warmup_steps", None)
    if warmup is None:
        warmup = int(round(optim_cfg.get("warmup_frac", 0.0) * total_steps))
    groups = [("default", None, optim_cfg.lr)] + [
        (f"group{i}", re.compile(g["pattern"]), g["lr"]) for i, g in enumerate(optim_cfg.get("groups", []))
    ]

    def label(keypath) -> str:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", ""))) for k in keypath if hasattr(k, "key") or hasattr(k, "idx"))
        for gname, pattern, _ in groups[1:]:
            if pattern.search(name):
                return gname
        return "default"

    def labels(params):
        return jax.tree_util.tree_map_with_path(lambda kp, _: label(kp), params)
    scheds, txs = {}, {}
    for gname, _, lr in groups:
        sched = schedule(lr, total_steps, kind=optim_cfg.get("schedule", "cosine"), warmup_steps=warmup,
                         end_factor=optim_cfg.get("end_factor", 0.0))
        scheds[gname] = sched
        txs[gname] = optax.adamw(sched, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                                 eps=optim_cfg.get("eps", 1e-8), weight_decay=optim_cfg.get("weight_decay", 0.0))
    parts = []
    if optim_cfg.get("clip_norm", 0.0):
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.multi_transform(txs, labels) if len(groups) > 1 else txs["default"])
    return optax.chain(*parts), scheds


def state_shardings(tx: optax.GradientTransformation, params, mesh):
    """Shardings for `tx.init(params)`: a leaf that mirrors a parameter (Adam's mu and nu: its key path ends with
    the parameter's path, same shape) gets that parameter's sharding; the rest (step counts) are replicated.

    Needed because `jax.jit(tx.init)(params)` alone replicates the whole state: init reads only shapes, so jit
    prunes the params from its inputs and the zeros carry no sharding (every device would hold full moments)."""
    keystr = jax.tree_util.keystr
    by_path = {keystr(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(params)}
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def pick(kp, x):
        for i in range(len(kp)):
            p = by_path.get(keystr(kp[i:]))
            if p is not None and p.shape == x.shape and isinstance(p.sharding, jax.sharding.NamedSharding):
                return p.sharding
        return rep

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


def init_state(tx: optax.GradientTransformation, params, mesh):
    """`tx.init(params)` laid out like the params (see `state_shardings`)."""
    return jax.jit(tx.init, out_shardings=state_shardings(tx, params, mesh))(params)
