"""Dataset-level scoring and feature capture: batched, resumable, sharded by host, encoded exactly as in training.

    score_dataset(model, tok, llava_requests("captions.json", "images/"), "ppl.jsonl")      # POINTS filtering
    capture_dataset(model, tok, requests, "feats/", layers=(3, 7, 11, 15, 19),               # COINCIDE features
                    parts=("attn",), span="after_image", dtype="bfloat16")

Both take `vlmjax.generate.Request`s (conversations + images); the scored span is the last assistant reply plus
its end-of-turn token, tokenised by the training pipeline's template code. Scoring packs several requests per row
by default (`scoring.packed`: short pairs padded to their batch's longest waste the forward). Like `generate_dataset`: outputs are
keyed by `sample_keys` (ids, or source:index when ids repeat), each host (`shard_index` of `shard_count`, default
the jax process) runs its share into its own output, merged with coverage checks when the hosts are one job's
processes; samples that cannot be encoded become {"id", "error"} records, counted and not retried unless
`retry_errors`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from vlmjax.generate.dataset import (check_local_mesh, error_records, iter_batches, merge_hosts, record_head,
                                     shard_work)
from vlmjax.generate.jsonl import ResumableJsonl
from vlmjax.generate.requests import Encoder, Request, collate_images, image_pos_of, image_slots
from vlmjax.generate.shards import host_shard, merge_shards, shard_path
from vlmjax.scoring.capture import GROUPS, SPANS, features
from vlmjax.scoring.loglik import data_parallel, pad_rows, sequence_scores
from vlmjax.scoring.packed import PackedScorer, default_max_images
from vlmjax.scoring.shards import ShardWriter, merge_feature_shards, row_dtype


def score_dataset(model, tokenizer, requests: Sequence[Request], out_path, *, batch_size: int = 16,
                  which: str = "last", encoder: Encoder | None = None, pad_to: int = 32, pack: bool = True,
                  row_len: int | None = None, max_images: int | None = None, mesh=None,
                  shard_index: int | None = None, shard_count: int | None = None, retry_errors: bool = False,
                  progress: bool = True, stats: dict | None = None) -> dict:
    """Append {"id", **meta, "sum_logprob", "num_tokens", "mean_logprob", "perplexity"} per request to JSONL
    ({"id", **meta, "error"} for a request that cannot be encoded). Returns counts as `generate_dataset` does.

    batch_size: rows per forward. pack=False: one request per row, padded to the batch's longest (a multiple of
    `pad_to`); pack=True: requests packed first-fit into rows of `row_len` tokens and `max_images` image slots
    (`scoring.packed`; same scores; None: `auto_row_len` / `default_max_images` of the first batch, or of the
    first batch with images when the first ones are text-only), and one longer than a row is scored alone.
    stats: filled with the packer's counts (batches, tokens, long)."""
    encoder = encoder or Encoder(tokenizer, model.cfg)
    i, n = host_shard(shard_index, shard_count)
    check_local_mesh(mesh, n)
    rows_per_batch = -(-batch_size // data_parallel(mesh)) * data_parallel(mesh)
    path = shard_path(out_path, i, n)
    scorer, packed_stats = None, {}
    with ResumableJsonl(path, retry_errors=retry_errors) as out:
        keys, todo, run = shard_work(requests, out, i, n)

        def write(done):
            out.write({**record_head(k, r), "sum_logprob": float(s["sum_logprob"]),
                       "num_tokens": int(s["num_tokens"]), "mean_logprob": float(s["mean_logprob"]),
                       "perplexity": float(s["perplexity"])} for (k, r), s in done)
            run["written"] += len(done)

        for batch, enc, failed in iter_batches(todo, batch_size, lambda kr: encoder.scored(kr[1], which),
                                               desc="score", progress=progress):
            out.write(error_records(failed))
            run["failed"] += len(failed)
            if not batch:
                continue
            if pack:
                resize = (scorer is not None and max_images is None and scorer.shape.max_images == 0
                          and any(e.pixels is not None for e in enc))
                if resize:  # text only so far: with 0 image slots every image request would be scored alone
                    write(scorer.finish())
                    packed_stats = _add_counts(packed_stats, scorer.stats)
                if scorer is None or resize:
                    scorer = _packed_scorer(model, encoder, enc, rows_per_batch, row_len, max_images, pad_to, mesh)
                for item, e in zip(batch, enc):
                    write(scorer.add(item, e))
                continue
            ids, tgt = pad_rows([e.ids for e in enc], [e.target for e in enc], pad_to=pad_to,
                                batch_size=rows_per_batch)
            px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
            s = sequence_scores(model, ids, tgt, px, rows, image_pos=image_pos_of(enc), mesh=mesh)
            write([(kr, {k: v[b] for k, v in s.items()}) for b, kr in enumerate(batch)])
        if scorer is not None:
            write(scorer.finish())
    if stats is not None and scorer is not None:
        stats.update(_add_counts(packed_stats, scorer.stats), row_len=scorer.row_len, rows=scorer.rows,
                     max_images=scorer.shape.max_images)
    merged = merge_hosts(os.fspath(out_path), keys, i, n,
                         lambda p, ks: merge_shards([shard_path(p, j, n) for j in range(n)], p, ids=ks))
    return {**run, "out": path, "merged": merged}


def _add_counts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {*a, *b}}


def auto_row_len(enc, pad_to: int) -> int:
    """Packed row width from a first batch: 4x its mean request, at least its longest, a multiple of pad_to."""
    lengths = [len(e.ids) for e in enc]
    return -(-max(max(lengths), 4 * int(np.mean(lengths))) // pad_to) * pad_to


def _packed_scorer(model, encoder, enc, rows, row_len, max_images, pad_to, mesh) -> PackedScorer:
    row_len = row_len or auto_row_len(enc, pad_to)
    cfg, spec = model.cfg, encoder.image_spec
    return PackedScorer(
        model, rows=rows, row_len=row_len, pad_to=pad_to, mesh=mesh,
        max_images=max_images if max_images is not None else default_max_images(enc, rows, row_len),
        image_size=spec.image_size if spec is not None else 1,
        tokens_per_tile=cfg.tokens_per_image if getattr(cfg, "image_layout", "tiles") == "llava_next" else 0)


class _Done:
    """Keys on disk for a capture folder: feature rows (the shard writer) plus error records."""

    def __init__(self, rows: ShardWriter, errors: ResumableJsonl):
        self.done, self.errors = rows.done | errors.done, errors.errors


def host_dir(out_dir, index: int, count: int) -> str:
    """Where host `index` of `count` writes its capture shards: `out_dir` itself, or `out_dir/host-i-of-n`."""
    out_dir = os.fspath(out_dir)
    return out_dir if count == 1 else os.path.join(out_dir, f"host-{index:05d}-of-{count:05d}")


def capture_dataset(model, tokenizer, requests: Sequence[Request], out_dir, *, layers: Sequence[int],
                    parts: Sequence[str] = ("attn", "resid"), span: str = "all", dtype: str = "float32",
                    batch_size: int = 16, shard_size: int = 4096, encoder: Encoder | None = None, pad_to: int = 32,
                    mesh=None, shard_index: int | None = None, shard_count: int | None = None,
                    retry_errors: bool = False, progress: bool = True) -> dict:
    """Stream (len(parts), len(layers), 2, D) rows per sample into `out_dir` shards (see scoring.shards), computed
    in fp32 and stored as `dtype` (float32 | float16 | bfloat16). span: the text group's tokens (`all`,
    `after_image`, `assistant`; scoring.capture). Failures go to `out_dir/errors.jsonl`. With several hosts each
    writes `host_dir(out_dir, i, n)`; `merge_feature_shards` joins them into `out_dir` (done here when the hosts
    are this job's processes). Returns counts as `generate_dataset` does."""
    if span not in SPANS:
        raise ValueError(f"span={span!r}: use one of {SPANS}")
    row_dtype(dtype)
    encoder = encoder or Encoder(tokenizer, model.cfg)
    i, n = host_shard(shard_index, shard_count)
    check_local_mesh(mesh, n)
    rows_per_batch = -(-batch_size // data_parallel(mesh)) * data_parallel(mesh)
    d = (model.llm if hasattr(model, "llm") else model).cfg.hidden_size
    meta = {"parts": list(parts), "layers": [int(x) for x in layers], "groups": list(GROUPS), "span": span}
    row_shape = (len(parts), len(layers), len(GROUPS), d)
    path = host_dir(out_dir, i, n)

    def encode(kr):
        if span != "assistant":
            return encoder.full(kr[1])
        e = encoder.scored(kr[1], "all")
        if not e.target.any():
            raise ValueError(f"sample {kr[1].id}: no assistant reply for span='assistant'")
        return e

    with ShardWriter(path, row_shape, dtype, shard_size=shard_size, meta=meta) as out, \
            ResumableJsonl(os.path.join(path, "errors.jsonl"), retry_errors=retry_errors) as errs:
        if out.index["meta"] != meta:
            raise ValueError(f"{path} was written with {out.index['meta']}, not {meta}")
        keys, todo, stats = shard_work(requests, _Done(out, errs), i, n)
        for batch, enc, failed in iter_batches(todo, batch_size, encode, desc="capture", progress=progress):
            errs.write(error_records(failed))
            stats["failed"] += len(failed)
            if not batch:
                continue
            ids, tgt = pad_rows([e.ids for e in enc], [e.target for e in enc] if span == "assistant" else None,
                                pad_to=pad_to, batch_size=rows_per_batch)
            lengths = np.zeros(len(ids), np.int32)
            lengths[: len(enc)] = [len(e.ids) for e in enc]
            px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
            feats = features(model, ids, lengths, px, rows, layers=layers, parts=parts, image_pos=image_pos_of(enc),
                             span=span, text_mask=tgt if span == "assistant" else None, mesh=mesh)
            out.add([k for k, _ in batch], feats[: len(batch)])
            stats["written"] += len(batch)
    merged = merge_hosts(os.fspath(out_dir), keys, i, n, lambda p, ks: merge_feature_shards(
        [host_dir(p, j, n) for j in range(n)], p, ids=ks))
    return {**stats, "out": path, "merged": merged}
