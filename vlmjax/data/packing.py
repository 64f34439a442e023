"""Packing tokenised samples and their images into fixed-shape batches, as a checkpointable grain IterDataset.

Fixed shapes keep the jitted train step from recompiling; packing several short samples per row (with segment ids
and restarting positions, so attention and RoPE treat them as separate sequences) avoids spending most of a batch on
padding. Images cannot be packed per row: their tiles go into one (N, H, W, 3) array per batch with `image_rows`,
ordered by (row, position in row), so the model splices them with a running count over image tokens.

Placement is greedy first-fit over the rows of the batch being built: a sample goes into the first row with room for
its tokens, if the batch still has image slots for its tiles; when it fits nowhere the batch is emitted and the
sample starts the next one. A unit has one sequence (SFT) or two (DPO: chosen and rejected). A DPO pair takes the
same row index and segment id in both halves, rows [0, B) chosen and [B, 2B) rejected, its tiles duplicated, so
pair i of segment k in row r is (row r, segment k) vs (row B + r, segment k) in packed and padded mode alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from vlmjax.data.errors import Skipped


@dataclasses.dataclass
class Unit:
    """A tokenised sample: 1 sequence (SFT) or 2 (DPO chosen, rejected) of (ids int32, trained bool), and its
    image tiles (k, H, W, 3) uint8, shared by the sequences."""

    seqs: tuple[tuple[np.ndarray, np.ndarray], ...]
    pixels: np.ndarray
    sample_id: str | None = None
    image_pos: np.ndarray | None = None  # per image token, the tile feature it takes (see data.text.Encoded)


@dataclasses.dataclass(frozen=True)
class BatchShape:
    rows: int  # B: rows per part (SFT batch size; DPO pairs per batch)
    seq_len: int  # S
    max_images: int  # N: image tiles per batch (all parts together)
    image_size: int
    parts: int = 1  # 1 SFT, 2 DPO
    pack: bool = True
    image_token_id: int | None = None  # targets that would be this id are written as 0
    tokens_per_tile: int = 0  # > 0: also write `image_pos` (layouts whose token count depends on the image)
    pixel_dtype: str = "uint8"  # training moves uint8 tiles; scoring packs already-normalised float32 ones


class BatchBuilder:
    """Accumulates units for one batch, then writes the contract arrays."""

    def __init__(self, shape: BatchShape):
        self.shape = shape
        self.rows: list[list[Unit]] = [[] for _ in range(shape.rows)]
        self.used = np.zeros((shape.rows, shape.parts), np.int64)
        self.images = 0
        self.count = 0
        self.skipped: list[tuple] = []

    @property
    def empty(self) -> bool:
        return self.count == 0 and not self.skipped

    def full(self) -> bool:
        return not self.shape.pack and self.count == self.shape.rows

    def add(self, unit: Unit) -> bool:
        """Places the unit in the first row with room; False if it fits nowhere in this batch."""
        lengths = np.array([len(ids) for ids, _ in unit.seqs])
        tiles = len(unit.pixels) * self.shape.parts
        if self.images + tiles > self.shape.max_images:
            return False
        for r, row in enumerate(self.rows):
            if (self.shape.pack or not row) and np.all(self.used[r] + lengths <= self.shape.seq_len):
                row.append(unit)
                self.used[r] += lengths
                self.images += tiles
                self.count += 1
                return True
        return False

    def finalize(self) -> dict[str, Any]:
        shape = self.shape
        n_rows = shape.rows * shape.parts
        out = {
            "input_ids": np.zeros((n_rows, shape.seq_len), np.int32),
            "targets": np.zeros((n_rows, shape.seq_len), np.int32),
            "loss_mask": np.zeros((n_rows, shape.seq_len), np.float32),
            "segment_ids": np.zeros((n_rows, shape.seq_len), np.int32),
            "positions": np.zeros((n_rows, shape.seq_len), np.int32),
            # uint8 until `DataIterator` normalises it in the consuming process (4x less to move between processes).
            "pixel_values": np.zeros((shape.max_images, shape.image_size, shape.image_size, 3), shape.pixel_dtype),
            "image_rows": np.full((shape.max_images,), -1, np.int32),
        }
        if shape.tokens_per_tile:
            out["image_pos"] = np.zeros((n_rows, shape.seq_len), np.int32)
        slot = 0
        ids_list = []
        for part in range(shape.parts):
            for r, units in enumerate(self.rows):
                row = part * shape.rows + r
                offset = 0
                n_pos, tiles_before = 0, 0  # the row's image tokens and tiles so far
                for segment, unit in enumerate(units, start=1):
                    ids, trained = unit.seqs[part]
                    end = offset + len(ids)
                    out["input_ids"][row, offset:end] = ids
                    out["targets"][row, offset:end - 1] = ids[1:]  # the last token of a sample has no target
                    if shape.image_token_id is not None:  # never trained, and the id may lie outside the vocab,
                        t = out["targets"][row, offset:end - 1]  # where a gather of log-probs gives NaN, not 0
                        t[t == shape.image_token_id] = 0
                    out["loss_mask"][row, offset:end - 1] = trained[1:]
                    out["segment_ids"][row, offset:end] = segment
                    out["positions"][row, offset:end] = np.arange(len(ids))
                    offset = end
                    if shape.tokens_per_tile and unit.image_pos is not None:
                        pos, n = unit.image_pos, len(unit.image_pos)
                        first = tiles_before * shape.tokens_per_tile
                        out["image_pos"][row, n_pos:n_pos + n] = np.where(pos >= 0, pos + first, -1)
                        n_pos += n
                    k = len(unit.pixels)
                    tiles_before += k
                    out["pixel_values"][slot:slot + k] = unit.pixels
                    out["image_rows"][slot:slot + k] = row
                    slot += k
                    if part == 0:
                        ids_list.append(unit.sample_id)
        out["_meta"] = {"samples": self.count, "skipped": list(self.skipped), "ids": ids_list}
        return out


def fill_counts(batch: dict[str, np.ndarray], image_token_id: int | None = None) -> dict[str, int]:
    """How much of a packed batch's fixed shape carries data; the rest is padding the step computes anyway.
    slots = rows x seq_len; tokens = slots with segment id > 0, split into image_tokens (`input_ids` ==
    `image_token_id`, 0 when None) and text_tokens; rows_used = rows holding a token; images = `image_rows` >= 0
    out of image_slots (N)."""
    seg, ids, image_rows = batch["segment_ids"], batch["input_ids"], batch["image_rows"]
    real = seg > 0
    tokens = int(real.sum())
    image = int((real & (ids == image_token_id)).sum()) if image_token_id is not None else 0
    return {"slots": int(seg.size), "tokens": tokens, "image_tokens": image, "text_tokens": tokens - image,
            "rows": int(seg.shape[0]), "rows_used": int(real.any(axis=1).sum()),
            "images": int((image_rows >= 0).sum()), "image_slots": int(image_rows.shape[0])}


class PackedBatchIterDataset(grain.IterDataset):
    """Units (and `Skipped` markers) -> batches. Emits the last partial batch when the parent is exhausted."""

    def __init__(self, parent: grain.IterDataset, shape: BatchShape):
        super().__init__(parent)
        self._shape = shape

    def __iter__(self):
        return _PackedBatchIterator(self._parent.__iter__(), self._shape)

    def __str__(self):
        return f"PackedBatchIterDataset({self._shape})"


class _PackedBatchIterator(grain.DatasetIterator):
    """State = the parent's state before the first element of the batch being built + how many elements of it were
    consumed; restoring replays those elements, so a resumed iterator emits exactly the batches it would have."""

    def __init__(self, parent: grain.DatasetIterator, shape: BatchShape):
        super().__init__(parent)
        self._shape = shape
        self._builder = BatchBuilder(shape)
        self._start_state = parent.get_state()
        self._consumed = 0
        self._exhausted = False

    def _take(self, element) -> bool:
        if isinstance(element, Skipped):
            self._builder.skipped.append(
                (element.reason, element.sample_id, element.source, element.message))
            return True
        return self._builder.add(element)

    def __next__(self):
        if self._exhausted:
            raise StopIteration
        while True:
            state = self._parent.get_state()
            try:
                element = next(self._parent)
            except StopIteration:
                self._exhausted = True
                if self._builder.count:
                    return self._builder.finalize()
                raise
            if self._take(element):
                self._consumed += 1
                if self._builder.full():
                    return self._emit(self._parent.get_state(), None)
                continue
            return self._emit(state, element)

    def _emit(self, next_start_state, carry):
        batch = self._builder.finalize()
        self._builder = BatchBuilder(self._shape)
        self._start_state, self._consumed = next_start_state, 0
        if carry is not None:
            if not self._take(carry):
                raise AssertionError("a unit that cannot fit an empty batch reached the packer")
            self._consumed = 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._start_state, "consumed": self._consumed, "exhausted": self._exhausted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._start_state = state["parent"]
        self._builder = BatchBuilder(self._shape)
        self._consumed = 0
        self._exhausted = bool(state["exhausted"])
        for _ in range(int(state["consumed"])):
            if not self._take(next(self._parent)):
                raise RuntimeError("replaying the packer state did not reproduce the batch; is the pipeline "
                                   "deterministic?")
            self._consumed += 1
