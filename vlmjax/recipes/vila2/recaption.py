"""Round k's recaptions: the model describes every image of a caption source, one seeded prompt per image.

Composes `generate.requests_from_source` (the caption records as the trainer parses them; a bad record becomes an
error record naming sample and file) and `generate.generate_dataset` (host-sharded, resumable by key, sampling
streams per key, `Request.meta` copied to the output). Output `DIR/recaptions.r{k}.jsonl` (per host
`recaptions.r{k}-0000i-of-0000n.jsonl` until `combine` merges them): {"id", "round", "model", "prompt_id", "prompt",
"output", "finish_reason", "num_tokens", "caption" (the original), "image"}.
"""

from __future__ import annotations

import dataclasses
import os

from vlmjax.data.formats import PLACEHOLDER
from vlmjax.generate import generate_dataset, requests_from_source, sample_keys
from vlmjax.generate.requests import Request
from vlmjax.recipes.vila2.prompts import PROMPTS, prompt_id
from vlmjax.recipes.vila2.state import RunState


def recaptions_path(out_dir, round_: int) -> str:
    return os.path.join(os.fspath(out_dir), f"recaptions.r{int(round_)}.jsonl")


def recaption_requests(spec, round_: int, model_name: str, *, limit: int | None = None,
                       prompts: tuple[str, ...] | None = PROMPTS, salt: str = "vila2", meta: dict | None = None
                       ) -> list[Request]:
    """One request per caption record: the image and prompts[prompt_id(round, key)], with round, model and
    prompt_id (and `meta`) in meta, so they land in every output record, error records included. `prompts` /
    `salt`: a specialist's domain prompt(s) instead of the three recaption prompts. prompts None: the image alone
    under the plain template (prompt_id None), the format an aligned-only model was trained in ("<image>caption"):
    a chat prompt is text it has never seen."""
    if prompts is None:
        reqs = requests_from_source(spec, role="generate", prompt=None, limit=limit)
        extra = {**(meta or {}), "round": int(round_), "model": model_name, "prompt_id": None}
        return [dataclasses.replace(r, meta={**r.meta, **extra}) for r in reqs]
    prompts = tuple(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() and PLACEHOLDER not in p for p in prompts):
        raise ValueError(f"recaption prompts must be non-empty strings without {PLACEHOLDER} (the image goes "
                         f"first), got {prompts!r}")
    reqs = requests_from_source(spec, role="generate", prompt=prompts[0], limit=limit)
    out = []
    for key, r in zip(sample_keys(reqs), reqs):
        pid = prompt_id(round_, key, len(prompts), salt)
        extra = {**r.meta, **(meta or {}), "round": int(round_), "model": model_name, "prompt_id": pid}
        if r.error is None:  # the image placeholder first, then the instruction (as requests_from_source does)
            head = r.messages[0]["content"]
            messages = [{"role": "user", "content": head[: len(head) - len(prompts[0])] + prompts[pid]}]
            out.append(dataclasses.replace(r, messages=messages, meta=extra))
        else:
            out.append(dataclasses.replace(r, meta=extra))
    return out


def recaption(model, tokenizer, spec, out_dir, round_: int, model_name: str, config, *, batch_size: int = 16,
              shard_index: int | None = None, shard_count: int | None = None, encoder=None, mesh=None,
              limit: int | None = None, progress: bool = True, prompts: tuple[str, ...] | None = PROMPTS,
              salt: str = "vila2", meta: dict | None = None) -> dict:
    """Recaption this host's shard of `spec` (a caption-format `SourceSpec`) into `out_dir` (a specialist: its own
    folder, its `prompts`, `salt` and `meta`; `vila2.specialist`). state.json records
    the round and model first (resuming a round with another model is an error naming both) and marks the
    recaption step finished once the output is whole (one host, or process 0 after merging this job's hosts;
    separate jobs' shards are merged and checked by `combine`). Returns `generate_dataset`'s counts."""
    state = RunState(out_dir)
    state.start(round_, model_name)
    reqs = recaption_requests(spec, round_, model_name, limit=limit, prompts=prompts, salt=salt, meta=meta)
    stats = generate_dataset(model, tokenizer, reqs, recaptions_path(out_dir, round_), config,
                             batch_size=batch_size, encoder=encoder, mesh=mesh, shard_index=shard_index,
                             shard_count=shard_count, progress=progress)
    if stats["merged"] is not None and (stats["shard"][1] == 1 or stats["shard"][0] == 0):
        RunState(out_dir).finish(round_, "recaption", records=len(reqs), out=stats["merged"])
    return stats
