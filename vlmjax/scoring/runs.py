"""Dataset-level scoring and feature capture: batched, resumable, encoded exactly as in training.

    score_dataset(model, tok, llava_requests("captions.json", "images/"), "ppl.jsonl")      # POINTS filtering
    capture_dataset(model, tok, requests, "feats/", layers=(3, 7, 11, 15, 19))               # COINCIDE features

Both take `vlmjax.generate.Request`s (conversations + images); the scored span is the last assistant reply plus
its end-of-turn token, tokenised by the training pipeline's template code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlmjax.generate.dataset import error_records, iter_batches, pending
from vlmjax.generate.jsonl import ResumableJsonl
from vlmjax.generate.requests import Encoder, Request, collate_images, image_pos_of, image_slots
from vlmjax.scoring.capture import GROUPS, features
from vlmjax.scoring.loglik import pad_rows, sequence_scores
from vlmjax.scoring.shards import ShardWriter


def score_dataset(model, tokenizer, requests: Sequence[Request], out_path, *, batch_size: int = 16,
                  which: str = "last", encoder: Encoder | None = None, pad_to: int = 32, progress: bool = True) -> dict:
    """Append {"id", **meta, "sum_logprob", "num_tokens", "mean_logprob", "perplexity"} per request to JSONL
    ({"id", **meta, "error"} for a request that cannot be encoded)."""
    encoder = encoder or Encoder(tokenizer, model.cfg)
    with ResumableJsonl(out_path) as out:
        todo = pending(requests, out.done)
        for batch, enc, failed in iter_batches(todo, batch_size, lambda r: encoder.scored(r, which), desc="score",
                                               progress=progress):
            out.write(error_records(failed))
            if not batch:
                continue
            ids, tgt = pad_rows([e.ids for e in enc], [e.target for e in enc], pad_to=pad_to, batch_size=batch_size)
            px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
            s = sequence_scores(model, ids, tgt, px, rows, image_pos=image_pos_of(enc))
            out.write({"id": r.id, **r.meta, "sum_logprob": float(s["sum_logprob"][i]),
                       "num_tokens": int(s["num_tokens"][i]), "mean_logprob": float(s["mean_logprob"][i]),
                       "perplexity": float(s["perplexity"][i])} for i, r in enumerate(batch))
    return {"written": len(todo), "skipped_done": len(requests) - len(todo)}


def capture_dataset(model, tokenizer, requests: Sequence[Request], out_dir, *, layers: Sequence[int],
                    parts: Sequence[str] = ("attn", "resid"), batch_size: int = 16, shard_size: int = 4096,
                    encoder: Encoder | None = None, pad_to: int = 32, progress: bool = True) -> dict:
    """Stream (len(parts), len(layers), 2, D) fp32 rows per sample into `out_dir` shards (see scoring.shards)."""
    encoder = encoder or Encoder(tokenizer, model.cfg)
    d = (model.llm if hasattr(model, "llm") else model).cfg.hidden_size
    meta = {"parts": list(parts), "layers": [int(i) for i in layers], "groups": list(GROUPS)}
    row_shape = (len(parts), len(layers), len(GROUPS), d)
    with ShardWriter(out_dir, row_shape, "float32", shard_size=shard_size, meta=meta) as out:
        if out.index["meta"] != meta:
            raise ValueError(f"{out_dir} was written with {out.index['meta']}, not {meta}")
        todo = pending(requests, out.done)
        for batch, enc, _failed in iter_batches(todo, batch_size, encoder.full, desc="capture", progress=progress):
            if not batch:  # failures are logged and retried by the next run (shards hold feature rows only)
                continue
            ids, _ = pad_rows([e.ids for e in enc], pad_to=pad_to, batch_size=batch_size)
            lengths = np.zeros(len(ids), np.int32)
            lengths[: len(enc)] = [len(e.ids) for e in enc]
            px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
            feats = features(model, ids, lengths, px, rows, layers=layers, parts=parts, image_pos=image_pos_of(enc))
            out.add([r.id for r in batch], feats[: len(batch)])
    return {"written": len(todo), "skipped_done": len(requests) - len(todo)}
