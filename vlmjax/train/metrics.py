"""Metrics out: a JSONL file (for scripts), TensorBoard (tensorboardX), and a tqdm progress bar with ETA.

`metrics.jsonl` is strict JSON: a NaN/inf value is written as null and its key listed under "nonfinite". A resumed
run replays the steps after its checkpoint, so opening at `initial_step` drops the rows after it from the JSONL
(rewritten atomically) and starts TensorBoard with `purge_step`, TensorBoard's own way of discarding them.
"""

from __future__ import annotations

import json
import math
import os

from tqdm.auto import tqdm


def json_row(step: int, metrics: dict, prefix: str = "") -> dict:
    row, bad = {"step": step}, []
    for k, v in metrics.items():
        v = float(v)
        if math.isfinite(v):
            row[prefix + k] = v
        else:
            row[prefix + k] = None
            bad.append(prefix + k)
    if bad:
        row["nonfinite"] = bad
    return row


def truncate_jsonl(path: str, last_step: int) -> int:
    """Drop rows whose step is after `last_step` (and a torn last line); returns how many rows were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if row.get("step", 0) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = None
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        truncate_jsonl(path, initial_step)
        self.jsonl = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=initial_step + 1)
        except ImportError:  # optional: JSONL always works
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = json_row(step, metrics, prefix)
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "nonfinite") and v is not None:
                    self.tb.add_scalar(k, v, step)
        if not prefix:
            loss = row.get("loss")
            self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}", refresh=False)

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
