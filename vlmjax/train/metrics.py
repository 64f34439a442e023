"""Metrics out: a JSONL file (for scripts), TensorBoard (tensorboardX), and a tqdm progress bar with ETA."""

from __future__ import annotations

import json
import math
import os

from tqdm.auto import tqdm


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # optional: JSONL always works
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if not prefix:
            self.bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
