"""Input pipeline throughput: samples/s of decode + transform + tokenize + pack on easy-VQA at 336 px.

    python bench/data.py [--data DIR] [--workers 0 1 2] [--seconds 20]

Builds easy-VQA's train split into a temporary folder unless --data points at an existing build, then times the
full pipeline (LLaVA conversations, CLIP pad-to-square + normalise at 336 px, 576 tokens per image, SmolLM2
ChatML template, first-fit packing into 4 x 2048 batches with up to 10 images) for each worker count. The first
batch (worker start-up, tokenizer load) is not timed. Ends with one `RESULT {json}` line per case; baseline is
the 0-worker rate.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from vlmjax.data import easy_vqa
from vlmjax.data.assets import smollm2_tokenizer
from vlmjax.data.image import ImageSpec
from vlmjax.data.pipeline import DataConfig, SourceSpec, make_iterator


def measure(data: str, tokenizer, workers: int, seconds: float) -> dict:
    config = DataConfig(
        sources=(SourceSpec(path=os.path.join(data, "train.json"), image_root=os.path.join(data, "images")),),
        batch_size=4, seq_len=2048, max_images=10, image=ImageSpec(image_size=336, tokens_per_image=576),
        num_workers=workers, shard_index=0, shard_count=1)
    with make_iterator(config, tokenizer) as it:
        start = time.perf_counter()
        next(it)
        first = time.perf_counter() - start
        used0, batches, tokens = it.stats.used, 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            batches += 1
            tokens += int((batch["segment_ids"] > 0).sum())
        elapsed = time.perf_counter() - start
        samples = it.stats.used - used0
    return {"workers": workers, "samples_per_s": samples / elapsed, "batches_per_s": batches / elapsed,
            "fill": tokens / (batches * config.batch_size * config.seq_len), "first_batch_s": first,
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="an existing `python -m vlmjax.data.easy_vqa` output folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    tokenizer = smollm2_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = tmp
            easy_vqa.build(data, ["train"])
        results = []
        for workers in args.workers:
            r = measure(data, tokenizer, workers, args.seconds)
            print(f"workers={workers}: {r['samples_per_s']:.1f} samples/s, {r['batches_per_s']:.2f} batches/s, "
                  f"row fill {r['fill']:.1%}, first batch {r['first_batch_s']:.1f} s ({r['samples']} samples)",
                  flush=True)
            results.append(r)
    baseline = next((r["samples_per_s"] for r in results if r["workers"] == 0), results[0]["samples_per_s"])
    for r in results:
        print("RESULT " + json.dumps({"case": f"easy_vqa_336px_workers={r['workers']}",
                                      "value": round(r["samples_per_s"], 2), "baseline": round(baseline, 2),
                                      "ratio": round(r["samples_per_s"] / baseline, 3)}))


if __name__ == "__main__":
    main()
