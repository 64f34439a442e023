"""STIC stage 1a: the model builds preference pairs from unlabeled images (shared/recipes/stic.md).

    python -m vlmjax.recipes.stic.make_preferences --model HF_LLAVA_DIR --images IMAGE_DIR --out pairs.jsonl

Per image (all choices drawn from a seed that is a function of the image id, so reruns and hosts agree):
  chosen    model(clean image, DETAILED prompt), temperature 0.2
  rejected  p=0.5 model(clean image, one of the HALLUCINATION prompts), else model(CORRUPTED image, the pair's
            simple prompt) with lowres or color_jitter (0.5 each; `PromptSet.corruptions`, `--corruptions`),
            really applied to the pixels
  stored    prompt = "<image>\\n" + one random SIMPLE prompt, the same for both sides
`negatives="plain"` (the no-negatives ablation) makes the rejected side model(clean image, simple prompt).

Both generation passes write resumable JSONL beside the output (`*.chosen.jsonl`, `*.rejected.jsonl`: a rerun
skips ids already generated); the pairs file is then written atomically. Pairs with a failed or empty side are
left out and counted. With several hosts (`shard_index` of `shard_count`, default the jax process) each generates
every `shard_count`-th image into its own files (`pairs.chosen-00001-of-00004.jsonl`, the library's
`generate_dataset` sharding); shard 0 then merges them (`generate.merge_shards`: every image present exactly once)
and writes the one pairs file. Under jax.distributed the hosts wait for each other; as separate jobs, rerun shard
0 once all are done (nothing is generated again) and it merges then.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from vlmjax.generate.dataset import generate_dataset
from vlmjax.generate.shards import IncompleteShards, host_shard, merge_shards, shard_paths
from vlmjax.generate.engine import GenerationConfig
from vlmjax.generate.jsonl import read_jsonl
from vlmjax.generate.requests import Encoder, Request, default_eos_ids, image_files
from vlmjax.generate.sampling import SamplingConfig
from vlmjax.recipes.stic import corrupt as corrupt_lib
from vlmjax.recipes.stic import prompts as P

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptSet:
    detailed: str = P.DETAILED
    hallucination: tuple[str, ...] = P.HALLUCINATION
    simple: tuple[str, ...] = P.SIMPLE
    # image corruptions for the corrupted-image negatives (`corrupt.corrupt` kinds), drawn uniformly per pair
    corruptions: tuple[str, ...] = corrupt_lib.KINDS


def plan(image_id: str, seed: int = 0, prompts: PromptSet = PromptSet(), negatives: str = "generated") -> dict:
    """How this image's pair is made: stored prompt, and how the rejected side is generated."""
    pair_seed = zlib.crc32(f"{seed}:{image_id}".encode())
    rng = np.random.default_rng(pair_seed)
    p = {"simple_prompt_id": int(rng.integers(len(prompts.simple))), "seed": pair_seed}
    use_hallucination, hall_id, corruption = rng.random() < 0.5, int(rng.integers(len(prompts.hallucination))), \
        prompts.corruptions[int(rng.integers(len(prompts.corruptions)))]
    if negatives == "plain":
        p["rejected_kind"] = "plain"
    elif negatives != "generated":
        raise ValueError(f"negatives={negatives!r}: use generated | plain")
    elif use_hallucination:
        p.update(rejected_kind="hallucination_prompt", hallucination_prompt_id=hall_id)
    else:
        p.update(rejected_kind="corruption", corruption=corruption)
        if corruption == "color_jitter":
            p["jitter"] = {k: round(v, 4) for k, v in corrupt_lib.jitter_factors(pair_seed).items()}
    return p


class CorruptingEncoder(Encoder):
    """Encodes a request's images with the corruption its meta names (meta["corruption"], meta["seed"])."""

    def source_image(self, req: Request, image):
        kind = req.meta.get("corruption")
        if kind is None:
            return image
        from vlmjax.data.image import decode_image

        # LLaVA-1.6 layouts then lay out the corrupted image's own size (the 20 px one has fewer tokens)
        return corrupt_lib.corrupt(decode_image(image, name=req.id), kind, req.meta["seed"])


def image_list(folder, *, limit: int | None = None) -> list[tuple[str, str]]:
    """(id, path relative to folder) for every image under `folder`, sorted; id = the relative path."""
    root = Path(folder)
    files = image_files(root, limit=limit)
    return [(str(p.relative_to(root)), str(p.relative_to(root))) for p in files]


def make_preferences(model, tokenizer, images: Sequence[tuple[str, str]], image_root, out_path, *,
                     prompts: PromptSet = PromptSet(), negatives: str = "generated", seed: int = 0,
                     max_new_tokens: int = 1024, min_new_tokens: int = 0, temperature: float = 0.2, batch_size: int = 16,
                     shard_index: int | None = None, shard_count: int | None = None, template: str = "auto",
                     mesh=None, progress: bool = True) -> dict:
    """Generate both sides for every image (id, path relative to `image_root`) and write the pairs JSONL.
    Returns counts: pairs written, and pairs left out by reason (on shards other than 0, and on shard 0 while
    other shards are unfinished, only this host's generation counts, with "pairs": None)."""
    shard_index, shard_count = host_shard(shard_index, shard_count)
    images = list(images)
    if len({i for i, _ in images}) != len(images):
        raise ValueError("image ids repeat: each image must appear once (ids name the pairs)")
    out_path = os.fspath(out_path)
    stem = os.path.splitext(out_path)[0]
    plans = {i: plan(i, seed, prompts, negatives) for i, _ in images}
    path_of = dict(images)
    full = lambda rel: os.path.join(image_root, rel) if image_root is not None else rel  # noqa: E731

    def request(image_id: str, prompt: str, meta: dict) -> Request:
        return Request(image_id, [{"role": "user", "content": P.with_image(prompt)}], [full(path_of[image_id])], meta)

    chosen = [request(i, prompts.detailed, {}) for i, _ in images]
    rejected = []
    for i, _ in images:
        p = plans[i]
        if p["rejected_kind"] == "hallucination_prompt":
            rejected.append(request(i, prompts.hallucination[p["hallucination_prompt_id"]], {}))
        elif p["rejected_kind"] == "corruption":
            rejected.append(request(i, prompts.simple[p["simple_prompt_id"]], {"corruption": p["corruption"], "seed": p["seed"]}))
        else:
            rejected.append(request(i, prompts.simple[p["simple_prompt_id"]], {}))
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              eos_token_ids=default_eos_ids(tokenizer, model.cfg),
                              sampling=SamplingConfig(temperature=temperature) if temperature > 0 else SamplingConfig(),
                              seed=seed)
    encoder = CorruptingEncoder(tokenizer, model.cfg, template=template)
    runs = {side: generate_dataset(model, tokenizer, reqs, f"{stem}.{side}.jsonl", config, batch_size=batch_size,
                                   encoder=encoder, mesh=mesh, shard_index=shard_index, shard_count=shard_count,
                                   progress=progress)
            for side, reqs in (("chosen", chosen), ("rejected", rejected))}
    generated = {side: {k: r[k] for k in ("requests", "written", "failed")} for side, r in runs.items()}
    if shard_count > 1:
        partial = {"images": len(images), "pairs": None, "shard": [shard_index, shard_count], "generated": generated}
        if shard_index != 0:
            return partial
        try:
            for side, r in runs.items():
                if r["merged"] is None:
                    merge_shards(shard_paths(f"{stem}.{side}.jsonl", shard_count), f"{stem}.{side}.jsonl",
                                 ids=[i for i, _ in images])
        except IncompleteShards as e:
            log.warning("%s: not every shard is done yet (%s); rerun shard 0 when they are", out_path, e)
            return {**partial, "waiting": str(e)}
    got_c, got_r = read_jsonl(f"{stem}.chosen.jsonl"), read_jsonl(f"{stem}.rejected.jsonl")
    stats = {"images": len(images), "pairs": 0, "failed": 0, "empty": 0, "identical": 0}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for i, _ in images:
            c, r = got_c.get(i, {}), got_r.get(i, {})
            if "error" in c or "error" in r or "output" not in c or "output" not in r:
                stats["failed"] += 1
                continue
            if not c["output"].strip() or not r["output"].strip():
                stats["empty"] += 1
                continue
            stats["identical"] += c["output"].strip() == r["output"].strip()
            p = plans[i]
            rec = {"id": i, "image": path_of[i], "prompt": P.with_image(prompts.simple[p["simple_prompt_id"]]),
                   "chosen": c["output"].strip(), "rejected": r["output"].strip(), **p}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            stats["pairs"] += 1
    os.replace(tmp, out_path)
    left_out = stats["failed"] + stats["empty"]
    if left_out:
        log.warning("%s: %d of %d images left out (%d failed to generate, %d empty)", out_path, left_out,
                    len(images), stats["failed"], stats["empty"])
    stats["out"] = out_path
    stats["generated"] = generated
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF LLaVA folder (or a vlmjax export)")
    ap.add_argument("--images", required=True, help="folder of unlabeled images (searched recursively)")
    ap.add_argument("--out", required=True, help="pairs JSONL (preference format)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--negatives", default="generated", choices=["generated", "plain"])
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corruptions", nargs="+", default=list(corrupt_lib.KINDS),
                    help="corruption kinds for the corrupted-image negatives (default: the paper's lowres "
                         "color_jitter; also lowres:PX, blur:RADIUS, shuffle:GRID)")
    ap.add_argument("--template", default="auto", help="chat template: auto (the checkpoint's) or a built-in name")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from vlmjax.generate.loading import load_model

    for kind in args.corruptions:
        corrupt_lib.parse_kind(kind)  # a typo fails before the model loads
    model, _cfg, tokenizer = load_model(args.model, dtype=args.dtype)
    stats = make_preferences(model, tokenizer, image_list(args.images, limit=args.limit), args.images, args.out,
                             prompts=PromptSet(corruptions=tuple(args.corruptions)), negatives=args.negatives,
                             seed=args.seed, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, batch_size=args.batch_size, template=args.template)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
