"""Blends with a defined epoch: one source sets the epoch, the others are drawn at a fixed ratio to it.

`MapDataset.mix` of finite sources ends when the first one runs out, so with `num_epochs=1` an epoch of a blend is
"until some source is exhausted" and no source is guaranteed one full pass. VILA's stage 3 wants one pass over the
visual data with text-only samples mixed in at a ratio: the source with `defines_epoch=True` is read exactly once
per epoch (each record once, in its shuffled order) and every other source contributes round(n * weight /
defining weight) records per epoch, cycling through its own records (reshuffled as grain's repeat does) for as
long as the run goes. The interleave is deterministic and smooth (the k-th record of a source sits near position
k / share of the epoch), so any window of the stream holds the sources at about their ratio.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


class EpochBlendMap(grain.transforms.DatasetSelectionMap):
    """Global index -> (source, index in that source's repeated dataset). `counts[d]`: records of source d per
    epoch; the defining source's parent holds exactly `epochs` passes, the others repeat forever."""

    def __init__(self, counts: list[int], epochs: int | None):
        if any(c < 0 for c in counts) or not sum(counts):
            raise ValueError(f"blend counts {counts} must be >= 0 with a positive total")
        self.counts, self.epochs = list(counts), epochs
        self.epoch_len = int(sum(counts))
        # smooth interleave: slot t goes to the source whose next record is due earliest ((k + 0.5) / c_d)
        due = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c])
        src = np.concatenate([np.full(c, d, np.int32) for d, c in enumerate(counts) if c])
        key = np.concatenate([np.arange(c, dtype=np.int64) for c in counts if c])
        order = np.lexsort((src, due))
        self.src, self.key = src[order], key[order]

    def __len__(self) -> int:
        return self.epoch_len * self.epochs if self.epochs else sys.maxsize

    def __getitem__(self, index: int) -> tuple[int, int]:
        if self.epochs and index >= len(self):
            raise IndexError(index)
        epoch, t = divmod(int(index), self.epoch_len)
        d = int(self.src[t])
        return d, epoch * self.counts[d] + int(self.key[t])


def blend_counts(lengths: list[int], weights: list[float], defining: int) -> list[int]:
    """Records per epoch of each source: all of the defining one, the others at their weight relative to it."""
    n, w = lengths[defining], weights[defining]
    return [n if d == defining else int(round(n * weights[d] / w)) for d in range(len(lengths))]
