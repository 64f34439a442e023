"""Packed scoring: many short requests per row, as the trainer packs them (POINTS scores millions of short pairs).

Padding every request of a batch to its longest wastes the forward on pad tokens when lengths vary. Here requests
go first-fit into a fixed grid of `rows` x `row_len` tokens and `max_images` image slots with
`data.packing.BatchBuilder` (segment ids, positions restarting per segment, no attention across segments, image
tiles in row order), so one compiled shape serves the whole run and the per-request scores equal the padded
path's. A request longer than a row (or with more tiles than the slots) is scored on its own, padded, in batches
of `rows`. Scores come back in the order requests were added within each flush, with the caller's item.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from vlmjax.data.packing import BatchBuilder, BatchShape, Unit
from vlmjax.generate.requests import Encoded, collate_images, image_pos_of, image_slots
from vlmjax.scoring.loglik import pad_rows, scores_from, sequence_scores, token_logprobs


def default_max_images(enc: Sequence[Encoded], rows: int, row_len: int) -> int:
    """Image slots per packed batch: the token grid at these requests' tiles-per-token density, plus 10% (slots
    beyond what the rows can hold run the vision tower on padding; too few leave rows part-empty)."""
    tiles = sum(0 if e.pixels is None else len(e.pixels) for e in enc)
    if not tiles:
        return 0
    tokens = sum(len(e.ids) for e in enc)
    most = max(len(e.pixels) for e in enc if e.pixels is not None)
    return max(most, math.ceil(1.1 * rows * row_len * tiles / tokens))


class PackedScorer:
    """`add(item, encoded)` -> [(item, scores)] of any batch it completed; `finish()` scores the rest.
    scores: {"sum_logprob", "num_tokens", "mean_logprob", "perplexity"} as `sequence_scores` gives per row."""

    def __init__(self, model, *, rows: int, row_len: int, max_images: int, image_size: int = 1,
                 tokens_per_tile: int = 0, chunk: int = 128, pad_to: int = 32, mesh=None):
        if row_len < 2:
            raise ValueError(f"row_len={row_len}: a row needs room for at least 2 tokens")
        self.model, self.rows, self.row_len, self.chunk, self.pad_to, self.mesh = (model, rows, row_len, chunk,
                                                                                   pad_to, mesh)
        self.shape = BatchShape(rows=rows, seq_len=row_len, max_images=max_images, image_size=image_size,
                                tokens_per_tile=tokens_per_tile, pixel_dtype="float32")
        self.empty_pixels = np.zeros((0, image_size, image_size, 3), np.float32)
        self.builder, self.items, self.long = BatchBuilder(self.shape), [], []
        self.stats = {"packed_batches": 0, "packed_tokens": 0, "long": 0}

    def add(self, item: Any, enc: Encoded) -> list[tuple[Any, dict]]:
        tiles = 0 if enc.pixels is None else len(enc.pixels)
        if len(enc.ids) > self.row_len or tiles > self.shape.max_images:
            self.long.append((item, enc))
            self.stats["long"] += 1
            return self._score_long() if len(self.long) == self.rows else []
        unit = Unit(seqs=((np.asarray(enc.ids, np.int32), np.asarray(enc.target, bool)),),
                    pixels=self.empty_pixels if enc.pixels is None else enc.pixels, sample_id=len(self.items),
                    image_pos=enc.image_pos)
        done = []
        if not self.builder.add(unit):
            done = self._score_packed()
            unit.sample_id = 0  # its index in the new batch
            if not self.builder.add(unit):
                raise AssertionError("a request that fits a row did not fit an empty batch")
        self.items.append((item, enc))
        return done

    def finish(self) -> list[tuple[Any, dict]]:
        return self._score_packed() + self._score_long()

    def _score_packed(self) -> list[tuple[Any, dict]]:
        builder, items = self.builder, self.items
        self.builder, self.items = BatchBuilder(self.shape), []
        if not items:
            return []
        b = builder.finalize()
        seg = b["segment_ids"]
        target = np.zeros(seg.shape, bool)  # the builder writes loss_mask[s] = trained[s + 1]: shift back
        target[:, 1:] = b["loss_mask"][:, :-1] > 0
        has_images = bool((b["image_rows"] >= 0).any())
        lp = token_logprobs(self.model, b["input_ids"], target, b["pixel_values"] if has_images else None,
                            b["image_rows"] if has_images else None, chunk=self.chunk,
                            image_pos=b.get("image_pos") if has_images else None, segment_ids=seg,
                            positions=b["positions"], mesh=self.mesh)
        # per (row, segment) sums; units were placed row by row, segment k = the k-th unit of its row
        width = seg.max() + 1
        flat = (np.arange(len(seg))[:, None] * width + seg).ravel()
        total = np.bincount(flat, weights=lp.ravel().astype(np.float64), minlength=len(seg) * width)
        count = np.bincount(flat, weights=target.ravel(), minlength=len(seg) * width).astype(np.int64)
        index = np.empty(len(items), np.int64)
        for r, units in enumerate(builder.rows):
            for k, u in enumerate(units, 1):
                index[u.sample_id] = r * width + k
        self.stats["packed_batches"] += 1
        self.stats["packed_tokens"] += int((seg > 0).sum())
        scores = scores_from(total[index], count[index])
        return [(item, {k: v[j] for k, v in scores.items()}) for j, (item, _) in enumerate(items)]

    def _score_long(self) -> list[tuple[Any, dict]]:
        long, self.long = self.long, []
        if not long:
            return []
        enc = [e for _, e in long]
        ids, tgt = pad_rows([e.ids for e in enc], [e.target for e in enc], pad_to=self.pad_to, batch_size=self.rows)
        px, img_rows = collate_images([e.pixels for e in enc], slots=image_slots(self.rows, enc))
        s = sequence_scores(self.model, ids, tgt, px, img_rows, chunk=self.chunk, image_pos=image_pos_of(enc),
                            mesh=self.mesh)
        return [(item, {k: v[i] for k, v in s.items()}) for i, (item, _) in enumerate(long)]
