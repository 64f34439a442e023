"""python -m vlmjax.train --config configs/x.py [--config.optim.lr=2e-5 ...] --workdir DIR

Multi-host: pass --coordinator=host:port --num_processes=N --process_id=i (or set the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, or run under a cluster jax.distributed detects by itself);
each host then reads its own data shard.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file (ml_collections)", lock_config=True)
flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl, TensorBoard logs")
flags.DEFINE_string("coordinator", os.environ.get("JAX_COORDINATOR_ADDRESS"), "multi-host coordinator host:port")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")), "multi-host process count")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")), "this process's index")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jax

    if FLAGS.coordinator or FLAGS.num_processes > 1:
        jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    from vlmjax.train.loop import summary_json, train

    summary = train(_CONFIG.value, FLAGS.workdir)
    if jax.process_index() == 0:
        print("SUMMARY " + summary_json(summary), flush=True)


def _dotted_keys(cfg, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        out.append(prefix + k)
        if hasattr(v, "items"):
            out += _dotted_keys(v, prefix + k + ".")
    return out


def check_overrides(argv: list[str]) -> None:
    """Fail before anything runs if a --config.key override names no key of the config file (with the list)."""
    import importlib.util

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None or not os.path.exists(path.split(":")[0]):
        return  # absl reports the missing flag / file itself
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_vlmjax_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    valid = set(_dotted_keys(module.get_config(arg) if arg else module.get_config()))
    bad = [a.split("=", 1)[0][len("--config."):] for a in argv if a.startswith("--config.")]
    bad = [k for k in bad if k not in valid]
    if bad:
        sys.exit(f"unknown config key(s) {bad} for {path}; valid keys:\n  " + "\n  ".join(sorted(valid)))


def run() -> None:
    check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    run()
