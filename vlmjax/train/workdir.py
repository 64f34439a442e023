"""A workdir belongs to one run: `config.json` records it, and a rerun resumes only when the configs agree on
what shapes the result. Keys that only steer execution or bookkeeping (checkpoint cadence, logging, workers,
remat, the mesh: a run may resume on another device count) may change between sessions; anything else
(model, data, optimizer, schedule length, objective) differing is refused with the keys named, instead of
silently overwriting `config.json` and continuing (or, for a finished run, training nothing)."""

from __future__ import annotations

import json
import os

# prefixes of keys that may differ on resume
MAY_CHANGE = ("train.save_every", "train.keep_checkpoints", "train.eval_every", "train.eval_batches",
              "train.peak_flops_per_device", "train.save_trainable", "train.max_consecutive_skips",
              "train.save_first_step", "train.nan_policy", "export_dir", "data.num_workers", "data.read_threads",
              "data.worker_buffer_size", "data.bad_samples.log_first", "eval_data", "model.remat",
              "loss.remat_logits", "loss.logits_budget_mb", "loss.chunk_size", "mesh", "sharding_rules")


class ConfigMismatch(RuntimeError):
    pass


def _flat(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        if d:
            return out
    out[prefix[:-1]] = d
    return out


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


def differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for keys present in both that differ and are not in MAY_CHANGE."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) & set(b)):
        if a[k] != b[k] and not any(k == p or k.startswith(p + ".") for p in MAY_CHANGE):
            out.append((k, a[k], b[k]))
    return out


def check_resume(workdir: str, config, resuming: bool) -> None:
    """Raise ConfigMismatch when `workdir` holds a checkpointed run of a different config."""
    path = os.path.join(workdir, "config.json")
    if not resuming or not os.path.exists(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = differences(old, config_dict(config))
    if diff:
        lines = "\n  ".join(f"{k}: {a!r} in {path}, {b!r} now" for k, a, b in diff)
        raise ConfigMismatch(f"{workdir} holds checkpoints of a run with another config:\n  {lines}\n"
                             "Use a new --workdir (or the old settings to resume that run).")


def write_config(workdir: str, config) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
