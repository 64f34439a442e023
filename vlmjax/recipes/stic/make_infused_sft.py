"""STIC stage 2 data: description-infused instruction data (shared/recipes/stic.md).

    python -m vlmjax.recipes.stic.make_infused_sft --model STAGE1_EXPORT --data llava_subset.json \
        --image-folder IMAGES --out infused.json

The stage-1 model describes each sample's image (one random simple prompt per sample, seeded by its id); the
description goes into the first user turn as "<image>\\nImage description:\\n{d}\\n\\n{question}"; answers stay the
ground truth. Descriptions are generated into a resumable JSONL beside the output (`*.descriptions.jsonl`), then the
LLaVA JSON is written atomically. Text-only samples pass through unchanged; samples whose description failed or
came out empty are left out; both are counted.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import zlib
from typing import Sequence

from vlmjax.generate.dataset import generate_dataset, sample_keys
from vlmjax.generate.engine import GenerationConfig
from vlmjax.generate.jsonl import read_jsonl
from vlmjax.generate.requests import Encoder, Request, default_eos_ids, read_records, record_images
from vlmjax.generate.sampling import SamplingConfig
from vlmjax.recipes.stic import prompts as P

log = logging.getLogger(__name__)


def describe_requests(records: Sequence[dict], image_folder, simple: Sequence[str] = P.SIMPLE, seed: int = 0
                      ) -> list[Request]:
    """One description request per sample with an image (its first image), prompt = a simple prompt by id."""
    out = []
    for i, rec in enumerate(records):
        imgs = record_images(rec)
        if not imgs:
            continue
        sid = str(rec.get("id", i))
        prompt = simple[zlib.crc32(f"{seed}:{sid}".encode()) % len(simple)]
        path = os.path.join(image_folder, imgs[0]) if image_folder is not None and isinstance(imgs[0], str) else imgs[0]
        out.append(Request(sid, [{"role": "user", "content": P.with_image(prompt)}], [path]))
    return out


def infuse(record: dict, description: str) -> dict:
    """The record with the description inserted into its first human turn (placeholder kept in front)."""
    rec = copy.deepcopy(record)
    turns = rec["conversations"]
    first = next(t for t in turns if t.get("from", t.get("role")) in ("human", "user"))
    key = "value" if "value" in first else "content"
    first[key] = P.infused(description, first[key])
    return rec


def make_infused_sft(model, tokenizer, records: Sequence[dict], image_folder, out_path, *, seed: int = 0,
                     max_new_tokens: int = 512, min_new_tokens: int = 0, temperature: float = 0.0, batch_size: int = 16,
                     template: str = "auto", mesh=None, progress: bool = True) -> dict:
    reqs = describe_requests(records, image_folder, seed=seed)
    desc_path = os.path.splitext(os.fspath(out_path))[0] + ".descriptions.jsonl"
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              eos_token_ids=default_eos_ids(tokenizer, model.cfg),
                              sampling=SamplingConfig(temperature=temperature), seed=seed)
    generate_dataset(model, tokenizer, reqs, desc_path, config, batch_size=batch_size,
                     encoder=Encoder(tokenizer, model.cfg, template=template), mesh=mesh, progress=progress)
    desc = read_jsonl(desc_path)
    # output keys of the described records (ids, or row:index when ids repeat: each record its own description)
    key_of = dict(zip([i for i, rec in enumerate(records) if record_images(rec)], sample_keys(reqs)))
    stats = {"samples": len(records), "infused": 0, "text_only": 0, "multi_image_first_described": 0,
             "failed": 0, "empty": 0}
    out = []
    for i, rec in enumerate(records):
        if not record_images(rec):
            stats["text_only"] += 1
            out.append(rec)
            continue
        d = desc.get(key_of[i], {})
        if "output" not in d:
            stats["failed"] += 1
            continue
        if not d["output"].strip():
            stats["empty"] += 1
            continue
        stats["multi_image_first_described"] += len(record_images(rec)) > 1
        out.append(infuse(rec, d["output"]))
        stats["infused"] += 1
    tmp = os.fspath(out_path) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, ensure_ascii=False)
    os.replace(tmp, out_path)
    if stats["failed"] or stats["empty"]:
        log.warning("%s: %d samples left out (%d failed, %d empty descriptions)", out_path,
                    stats["failed"] + stats["empty"], stats["failed"], stats["empty"])
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="stage-1 export (HF LLaVA folder)")
    ap.add_argument("--data", required=True, help="instruction subset, LLaVA JSON/JSONL")
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--out", required=True, help="description-infused LLaVA JSON")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from vlmjax.generate.loading import load_model

    model, _cfg, tokenizer = load_model(args.model, dtype=args.dtype)
    records = read_records(args.data)[: args.limit]
    print(json.dumps(make_infused_sft(model, tokenizer, records, args.image_folder, args.out, seed=args.seed,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                      template=args.template)))
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
