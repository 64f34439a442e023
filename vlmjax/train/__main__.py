"""python -m vlmjax.train --config configs/x.py[:stage] --workdir DIR [--config.optim.lr=2e-5 ...]

Every config key is settable as `--config.KEY=VALUE` (or `--config.KEY VALUE`); values are Python literals or
`dict(...)` calls, e.g. `--config.data.sources="(dict(format='llava', path='x.json', image_root='imgs'),)"`.
Unknown keys, ill-typed values and out-of-range enumerations fail before anything is built.
`--help` (with or without --config) lists every key and its default.

Multi-host: pass --coordinator=host:port --num_processes=N --process_id=i (or set the JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, or run under a cluster jax.distributed detects by itself);
each host then reads its own data shard.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

PROG = "python -m vlmjax.train"


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """-> (other args, ["key=value", ...]) from `--config.key=value` and `--config.key value`."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{PROG}: error: {a} needs a value")
                body, i = f"{body}={argv[i + 1]}", i + 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def _config_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parser(argv: list[str]) -> argparse.ArgumentParser:
    """The argument parser; its epilog lists the keys of the config named in `argv` (else defaults.base())."""
    from vlmjax.train import config_io, defaults

    spec = _config_arg(argv)
    try:
        cfg = config_io.load_config(spec, validate_config=False) if spec else config_io.fill_defaults(defaults.base())
        title = f"config keys of {spec} (set any with --config.KEY=VALUE)" if spec else \
            "config keys with their defaults (vlmjax/train/defaults.py; set any with --config.KEY=VALUE)"
        keys = "\n  ".join(config_io.describe(cfg))
    except Exception as e:  # --help must work even for a broken config file
        title, keys = f"could not load {spec}", f"{type(e).__name__}: {e}"
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train (or resume) a vision-language model as a config file describes: checkpoints, "
                    "metrics.jsonl, TensorBoard and an optional HF export go under --workdir.",
        epilog=f"{title}:\n  {keys}")
    p.add_argument("--config", required=True, metavar="FILE[:ARG]",
                   help="ml_collections config file defining get_config(); ':ARG' is passed to it (a stage name)")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard logs, config.json")
    p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="multi-host: coordinator host:port (default $JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num_processes", type=int, default=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                   help="multi-host: process count (default $JAX_NUM_PROCESSES or 1)")
    p.add_argument("--process_id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", "0")),
                   help="multi-host: this process's index (default $JAX_PROCESS_ID or 0)")
    p.add_argument("--print_config", action="store_true",
                   help="print the resolved config (file + overrides) and exit without training")
    return p


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = split_overrides(argv)
    args = parser(rest).parse_args(rest)
    from vlmjax.train import config_io

    try:
        config = config_io.load_config(args.config, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise SystemExit(f"{PROG}: error: {msg}") from None
    if args.print_config:
        print(config)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import jax

    if args.coordinator or args.num_processes > 1:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    from vlmjax.data.pipeline import ensure_absl_flags_parsed
    from vlmjax.train.loop import summary_json, train

    ensure_absl_flags_parsed()  # grain reads absl flags
    summary = train(config, args.workdir)
    if jax.process_index() == 0:
        print("SUMMARY " + summary_json(summary), flush=True)


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    run()
