"""Stage runner: one training stage of a multi-stage recipe, from a per-stage config file, resumable and idempotent.

    c = stage_config("configs/mini/base.py", "align")
    export = train_stage("align", run / "align", config_file="configs/mini/base.py", image_root=..., source=...,
                         over={"optim.lr": 1e-3})

A stage is done when its export folder holds config.json; `train_stage` then returns it without touching anything,
so a pipeline of stages reruns for free and resumes after an interruption (the loop itself resumes from its
checkpoints). Overrides are dotted config keys, as on the training CLI. Every stage writes WORKDIR/stage.json (steps,
seconds, CPU seconds, first/last loss, the loss curve) for the pipeline's report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from vlmjax.train.config_io import apply_overrides, load_config  # noqa: F401  (the stage runner's overrides)


def stage_config(config_file: str | Path, stage: str):
    """`get_config(stage)` of a per-stage config file, with the defaults filled in (`config_io`, the one loader;
    `train` validates it after the stage's overrides)."""
    return load_config(f"{config_file}:{stage}", validate_config=False)


def train_stage(stage: str, workdir: Path, *, config_file: str | Path, image_root: str, source: str | None = None,
                model_path: str | None = None, load_params: str | None = None, tokenizer: str | None = None,
                steps_scale: float = 1.0, over: dict | None = None, quiet: bool = False) -> Path:
    """Train `stage` of `config_file` in `workdir` (resuming from its checkpoints); returns the export folder.
    Skipped when already exported. source / image_root replace the first data source's paths; a from-scratch
    model (`model.init="random"`) takes `tokenizer` (default WORKDIR/../tokenizer); steps are scaled by
    steps_scale (at least 2) before the dotted `over`rides apply."""
    from vlmjax.train.loop import train

    workdir = Path(workdir)
    export = workdir / "export"
    from vlmjax.convert.native import is_native

    if (export / "config.json").exists() or is_native(export):
        return export
    c = stage_config(config_file, stage)
    if c.model.init == "random":
        c.model.tokenizer = str(tokenizer or workdir.parent / "tokenizer")
    if model_path is not None:
        c.model.path = model_path
    if load_params is not None:
        c.model.load_params = load_params
    src = dict(c.data.sources[0])
    src.update(image_root=image_root, **({"path": source} if source else {}))
    c.data.sources = (src,)
    c.train.steps = max(2, int(round(c.train.steps * steps_scale)))
    c.export_dir = str(export)
    apply_overrides(c, over)
    t0, cpu0 = time.time(), time.process_time()
    summary = train(c, str(workdir))
    losses = [float(h["loss"]) for h in summary["history"]]
    log = {"stage": stage, "steps": c.train.steps, "seconds": round(time.time() - t0, 1),
           "cpu_seconds": round(time.process_time() - cpu0, 1),
           "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-5:])) if losses else None}
    if c.train.objective == "dpo" and summary["history"]:
        log["reward_margin_last"] = float(np.mean([h.get("rewards/margin", np.nan) for h in summary["history"][-5:]]))
    if not quiet:
        print(f"  {stage}: {log}", flush=True)
    log["losses"] = [round(x, 5) for x in losses]
    (workdir / "stage.json").write_text(json.dumps(log))
    return export
