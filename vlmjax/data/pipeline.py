"""The training input pipeline on grain: sources -> shard -> shuffle -> repeat -> transform -> mix -> pack -> workers.

Determinism and resumption come from grain: everything up to the transform is an index-addressable `MapDataset`,
so a (seed, shard, num_workers) triple fixes the batch sequence, and the iterator state (grain's plus the packer's
and the skip counts) restores it exactly. Packing runs inside each worker process, so batches arrive ready-made;
changing `num_workers` changes the batch order (still deterministic), as grain documents for stateful transforms.

Entry point for a trainer: `make_iterator(config, tokenizer)`. Scripts that use `num_workers > 0` need an
`if __name__ == "__main__":` guard (workers are spawned and re-import the main module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grain
import numpy as np

from vlmjax.data.blend import EpochBlendMap, blend_counts
from vlmjax.data.errors import BadSamplePolicy, SkipStats
from vlmjax.data.image import ImageSpec, normalize
from vlmjax.data.packing import BatchShape, PackedBatchIterDataset
from vlmjax.data.sources import JsonRecords, tfds_records
from vlmjax.data.text import TextProcessor, TextSpec
from vlmjax.data.transform import SampleTransform


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One dataset. Exactly one of `path` (.json/.jsonl), `tfds` (a TFDS name read with `tfds.data_source`) or
    `records` (in-memory list). `image_root`: folder, .tar shard(s) glob or list, or None for inline/absolute
    images. `weight`: mixing weight among sources. `defines_epoch`: this source sets the epoch (one pass over it
    per epoch), every other source is drawn at weight / this weight records per record of it (see data/blend.py;
    without it, a blend of finite sources ends when the first runs out). `format_options`: passed to the parser
    (e.g. interleaved `max_images`, `min_similarity`)."""

    format: Literal["llava", "caption", "caption_qa", "interleaved", "preference"] = "llava"
    path: str | None = None
    tfds: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    records: Sequence[Mapping] | None = None
    image_root: Any = None
    weight: float = 1.0
    name: str | None = None
    defines_epoch: bool = False
    format_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def open(self):
        """-> (random-access records, name used in error messages)."""
        given = [x is not None for x in (self.path, self.tfds, self.records)]
        if sum(given) != 1:
            raise ValueError("a SourceSpec needs exactly one of path, tfds, records")
        if self.path is not None:
            return JsonRecords(self.path), self.name or str(self.path)
        if self.tfds is not None:
            return (tfds_records(self.tfds, self.tfds_split, self.tfds_data_dir),
                    self.name or f"tfds:{self.tfds}/{self.tfds_split}")
        return list(self.records), self.name or "<records>"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """batch_size: rows per batch (DPO: pairs, giving 2 * batch_size rows). seq_len: tokens per row; also the
    longest sample. max_images: image tiles per batch (N). pack: first-fit packing, else one sample per row.
    num_epochs: None repeats forever (use this for multi-host training: shards then never run out unevenly).
    shard_index/shard_count: default jax.process_index()/process_count(). read_threads: threads per process
    for the per-sample transform (PIL and the tokenizer release the GIL)."""

    sources: tuple[SourceSpec, ...]
    batch_size: int
    seq_len: int
    max_images: int
    image: ImageSpec = ImageSpec()
    text: TextSpec = TextSpec()
    mode: Literal["sft", "dpo"] = "sft"
    pack: bool = True
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    bad_samples: BadSamplePolicy = BadSamplePolicy()
    shard_index: int | None = None
    shard_count: int | None = None

    @property
    def parts(self) -> int:
        return 2 if self.mode == "dpo" else 1

    def validate(self) -> None:
        if self.mode not in ("sft", "dpo"):
            raise ValueError(f"mode must be 'sft' or 'dpo', got {self.mode!r}")
        if not self.sources:
            raise ValueError("no sources")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("batch_size must be >= 1 and seq_len >= 2")
        if self.max_images and self.max_images < self.parts * self.image.max_tiles_per_image:
            raise ValueError(f"max_images={self.max_images} cannot hold one image's {self.image.max_tiles_per_image} "
                             f"tiles x {self.parts} parts")


def batch_shapes(config: DataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every batch (for initialising a model or jitting a step before data arrives)."""
    rows, s, n, size = config.batch_size * config.parts, config.seq_len, config.max_images, config.image.image_size
    seq = ((rows, s), np.dtype(np.int32))
    return {"input_ids": seq, "targets": seq, "loss_mask": ((rows, s), np.dtype(np.float32)), "segment_ids": seq,
            "positions": seq, "pixel_values": ((n, size, size, 3), np.dtype(np.float32)),
            "image_rows": ((n,), np.dtype(np.int32)),
            **({"image_pos": seq} if config.image.image_layout != "tiles" else {})}


def _with_index(index, record):
    return index, record


def ensure_absl_flags_parsed() -> None:
    """grain reads absl flags; a program not started with absl.app.run has unparsed flags, which raise in workers."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    ensure_absl_flags_parsed()


def make_dataset(config: DataConfig, tokenizer, info: dict | None = None) -> tuple[grain.IterDataset, TextProcessor]:
    """The grain pipeline of batches, as moved between processes: each with a private "_meta" entry and uint8
    `pixel_values`; `DataIterator` removes the one and normalises the other. `info` (a dict) receives "records":
    the records this shard reads in all (None when the data repeats forever)."""
    config.validate()
    shard_index, shard_count = config.shard_index, config.shard_count
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    text = TextProcessor(tokenizer, config.text, config.image.tokens_per_image, config.seq_len)
    defining = [k for k, s in enumerate(config.sources) if s.defines_epoch]
    if len(defining) > 1:
        raise ValueError(f"sources {defining} all set defines_epoch: at most one source defines the epoch")
    datasets, weights, lengths = [], [], []
    for k, spec in enumerate(config.sources):
        records, name = spec.open()
        ds = grain.MapDataset.source(records).map_with_index(_with_index)
        ds = ds[shard_index::shard_count]
        if len(ds) == 0:
            raise ValueError(f"source {name} has no records for shard {shard_index} of {shard_count}")
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed * 1_000_003 + k)
        lengths.append(len(ds))
        epochs = None if defining and k != defining[0] else config.num_epochs  # blend: the others cycle
        if epochs != 1:
            ds = ds.repeat(epochs)
        ds = ds.map(SampleTransform(
            fmt=spec.format, source_name=name, image_root=spec.image_root, image_spec=config.image, text=text,
            policy=config.bad_samples, max_images=config.max_images, parts=config.parts,
            format_options=dict(spec.format_options)))
        datasets.append(ds)
        weights.append(spec.weight)
    if defining and len(datasets) > 1:
        counts = blend_counts(lengths, weights, defining[0])
        ds = grain.MapDataset.select_from_datasets(datasets, EpochBlendMap(counts, config.num_epochs))
    else:
        ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    if info is not None:
        info["records"] = len(ds) if config.num_epochs else None
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                              prefetch_buffer_size=max(4, 2 * config.read_threads)))
    shape = BatchShape(rows=config.batch_size, seq_len=config.seq_len, max_images=config.max_images,
                       image_size=config.image.image_size, parts=config.parts, pack=config.pack,
                       image_token_id=text.image_token_id,
                       tokens_per_tile=config.image.tokens_per_image if config.image.image_layout != "tiles" else 0)
    it = PackedBatchIterDataset(it, shape)
    if config.num_workers > 0:
        ensure_absl_flags_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                         per_worker_buffer_size=config.worker_buffer_size),
                            worker_init_fn=_worker_init)
    return it, text


class DataIterator:
    """Batches for the trainer (dicts of numpy arrays, see FORMATS.md), with skip accounting and exact resume.

    `get_state()` is JSON-serialisable; `set_state()` on an iterator built from the same config continues with
    exactly the batches the saved one would have produced. `last_ids` are the sample ids of the last batch."""

    def __init__(self, dataset: grain.IterDataset, policy: BadSamplePolicy, image_spec: ImageSpec,
                 image_token_id: int | None = None):
        self._it = iter(dataset)
        self.stats = SkipStats(policy)
        self.image_spec = image_spec
        self.image_token_id = image_token_id
        self.last_ids: list[str | None] = []
        self.records: int | None = None  # records this shard reads in all (None: forever)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise RuntimeError("the data iterator is closed")
        batch = next(self._it)
        meta = batch.pop("_meta")
        self.last_ids = list(meta["ids"])
        self.stats.update(int(meta["samples"]), [tuple(s) for s in meta["skipped"]])
        pixels = normalize(batch["pixel_values"], self.image_spec)
        pixels[batch["image_rows"] < 0] = 0.0
        batch["pixel_values"] = pixels
        return batch

    def get_state(self) -> dict:
        return {"pipeline": self._it.get_state(), "stats": self.stats.state()}

    def set_state(self, state: dict) -> None:
        self._it.set_state(state["pipeline"])
        self.stats.load(state["stats"])

    def close(self) -> None:
        """Stops worker processes. Also drops the grain iterator now: collected at interpreter exit instead, grain's
        finaliser can fail noisily."""
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_iterator(config: DataConfig, tokenizer) -> DataIterator:
    """The trainer's entry point: a checkpointable iterator of training batches for this host's shard."""
    info = {}
    ds, text = make_dataset(config, tokenizer, info)
    it = DataIterator(ds, config.bad_samples, config.image, text.image_token_id)
    it.records = info["records"]
    return it
