"""Input pipeline throughput and packing density of VILA-7B's three stages on offline stand-in data, against the
rate at which a 7B step consumes samples.

    python bench/data.py [--format caption interleaved blend] [--data DIR] [--limit N] [--workers 0 ...]
                         [--seconds 20] [--max-images N] [--text-share 0.2] [--gpus 8] [--peak-tflops 312]
                         [--mfu 0.4]

Each format runs one VILA stage's data settings through the trainer's own path. It loads
configs/vila/llama2_7b.py:STAGE with config_io, points data.sources at offline files (format, format_options and
weights kept), builds the DataConfig with `train.setup.data_config` and the VILA-7B model config, then iterates
`make_iterator`. The model config comes from bench/memory.py `model_arch` (Llama-2-7B + CLIP-L/14-336 + linear),
so images are the model's own 336 px and 576 tokens each.
  caption      align:    easy-vqa caption pairs; 32 rows x 2048, max_images 32, `plain` template.
  interleaved  pretrain: MMC4-style documents of 3-6 easy-vqa images, each right before its caption, among
                         sentences of the VILA miniature's fact corpus (`mini_data.make_documents`); 16 rows x
                         4096, <= 6 images per document, max_images 96, loss on all text. The real stage also mixes
                         in COYO pairs 1:1; here it is documents only.
  blend        sft:      easy-vqa LLaVA conversations + text-only fact QA (`mini_data.blend_records`) at
                         --text-share of the records by source weight (the miniature's 0.2; the 7B config's is
                         0.6); 16 rows x 4096, max_images 32, vicuna_v1.
Tokenizer: SmolLM2's (offline; Llama-2's is not on this machine), with `<image>` at len(tokenizer).

Per format it reports: the non-padding fraction (tokens with segment id > 0 over all rows x seq_len slots), split
into image and text tokens; the image slots used; and samples/s and packed rows/s, with the first batch not timed.
It also reports the ratio of samples/s to the samples/s that one 8-GPU host's 7B step consumes. That step is NOT
measured (there is no GPU here). Its time is estimated as one optimizer step's FLOPs / (gpus x peak x MFU). The
FLOPs come from `train_step.step_flops`: 6 x decoder params (4 x when the decoder is frozen, as in align) x rows x
seq_len, plus causal attention, plus the frozen tower's forward on all max_images slots, times grad_accum. The
peak (A100 bf16 dense, 312 TFLOP/s) and the MFU (0.40) are assumptions. The samples one step consumes are the
measured samples per batch x grad_accum. Padding slots cost the step as much as data slots, so the step time does
not depend on fill, but the samples per step do.
Ends with one `RESULT {json}` line per case. value = samples/s, baseline = the estimated samples/s of the 7B step,
ratio = value / baseline (> 1: this host's loader keeps up).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's vlmjax, not the installed one

import memory  # noqa: E402  bench/: model_arch (this import pins JAX to CPU; nothing here runs JAX)
import numpy as np  # noqa: E402
from train_step import load, step_flops  # noqa: E402

from vlmjax.data import default_image_token_id, easy_vqa, make_iterator  # noqa: E402
from vlmjax.data.assets import smollm2_tokenizer  # noqa: E402
from vlmjax.data.packing import fill_counts  # noqa: E402
from vlmjax.recipes.vila import mini_data  # noqa: E402
from vlmjax.train.config_io import load_config  # noqa: E402
from vlmjax.train.setup import data_config  # noqa: E402

VILA = "configs/vila/llama2_7b.py"
STAGE = {"caption": "align", "interleaved": "pretrain", "blend": "sft"}


def offline_files(data: str, tmp: str) -> dict[str, str]:
    """The stand-in files. `data` is an easy-vqa build; the documents and the text-only blend are written to `tmp`."""
    with open(os.path.join(data, "train_captions.jsonl")) as f:
        caps = [json.loads(line) for line in f if line.strip()]
    images = [{"id": c["id"], "image": c["image"], "caption": c["caption"]} for c in caps]
    facts = mini_data.facts()
    sentences = [s for d in mini_data.split_corpus(mini_data.corpus([], facts))[0] for s in d["sentences"]]
    docs = mini_data.make_documents(images, sentences, np.random.default_rng(0))
    files = {"captions": os.path.join(data, "train_captions.jsonl"), "llava": os.path.join(data, "train.json"),
             "images": os.path.join(data, "images"), "docs": os.path.join(tmp, "docs.jsonl"),
             "text": os.path.join(tmp, "fact_blend.json")}
    with open(files["docs"], "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(files["text"], "w") as f:
        json.dump(mini_data.blend_records(mini_data.fact_qa(facts)), f)
    return files


def stage_config(fmt: str, files: dict, workers: int, text_share: float, max_images: int | None = None):
    """configs/vila/llama2_7b.py:STAGE with its data.sources pointed at the offline files (and, when given, another
    image budget per batch)."""
    c = load_config(f"{VILA}:{STAGE[fmt]}")
    src = [dict(s) for s in c.data.sources]
    img = files["images"]
    if fmt == "caption":
        sources = (dict(src[0], path=files["captions"], image_root=img),)
    elif fmt == "interleaved":
        sources = (dict(src[0], path=files["docs"], image_root=img),)  # MMC4 only (the stage's COYO pairs left out)
    else:
        sources = (dict(src[0], path=files["llava"], image_root=img, weight=1.0 - text_share),
                   dict(src[1], path=files["text"], weight=text_share))
    c.data.sources = sources
    c.data.num_workers = workers
    if max_images is not None:
        c.data.max_images = max_images
    return c


def vila_model(tokenizer):
    """VILA-7B's model config (all three stages share align's assembled architecture), `<image>` = SmolLM2's."""
    c = load_config(f"{VILA}:align")
    cfg, label = memory.model_arch(VILA, c)
    return dataclasses.replace(cfg, image_token_id=default_image_token_id(tokenizer)), label


def measure(config, tokenizer, image_token_id: int, seconds: float) -> dict:
    """Iterates for `seconds` after an untimed first batch; fill counts summed over the timed batches."""
    with make_iterator(config, tokenizer) as it:
        start = time.perf_counter()
        next(it)
        first = time.perf_counter() - start
        used0, skipped0, batches = it.stats.used, it.stats.num_skipped, 0
        totals: dict[str, int] = {}
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            batches += 1
            for k, v in fill_counts(batch, image_token_id).items():
                totals[k] = totals.get(k, 0) + v
        elapsed = time.perf_counter() - start
        samples, skipped = it.stats.used - used0, it.stats.num_skipped - skipped0
    return {"samples_per_s": samples / elapsed, "rows_per_s": totals["rows"] / elapsed,
            "batches_per_s": batches / elapsed, "samples_per_batch": samples / batches,
            "fill": totals["tokens"] / totals["slots"], "fill_image": totals["image_tokens"] / totals["slots"],
            "fill_text": totals["text_tokens"] / totals["slots"], "rows_used": totals["rows_used"] / totals["rows"],
            "image_slots_used": totals["images"] / totals["image_slots"], "first_batch_s": first,
            "samples": samples, "batches": batches, "skipped": skipped, "seconds": elapsed}


def step_estimate(vcfg, c, samples_per_batch: float, gpus: int, peak_tflops: float, mfu: float) -> dict:
    """UNMEASURED: one optimizer step's FLOPs / (gpus x peak x MFU), and the samples/s that step consumes."""
    d, t = c.data, tuple(c.train.trainable)
    frozen = not any(re.search(p, "llm/layers/0/mlp/up_proj/kernel") for p in t)
    vit = any(re.search(p, "vision/layers/0/mlp/fc1/kernel") for p in t)
    flops = step_flops(vcfg, d.batch_size, d.seq_len, d.max_images, ref_forward=False, decoder_frozen=frozen,
                       vit_trainable=vit) * c.train.grad_accum
    step_s = flops / (gpus * peak_tflops * 1e12 * mfu)
    return {"step_tflop": flops / 1e12, "step_s": step_s, "decoder_frozen": frozen,
            "samples_per_step": samples_per_batch * c.train.grad_accum,
            "samples_per_s": samples_per_batch * c.train.grad_accum / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", nargs="+", choices=list(STAGE), default=list(STAGE))
    parser.add_argument("--data", help="an existing `python -m vlmjax.data.easy_vqa` output folder (train split)")
    parser.add_argument("--limit", type=int, default=1000, help="easy-vqa train images to build without --data")
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per case")
    parser.add_argument("--max-images", type=int, help="image tiles per batch instead of the stage's max_images")
    parser.add_argument("--text-share", type=float, default=0.2, help="blend: text-only share of the records")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per host of the estimated 7B step")
    parser.add_argument("--peak-tflops", type=float, default=312.0, help="per GPU (A100 bf16 dense: 312)")
    parser.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation of the 7B step")
    args = parser.parse_args()
    tokenizer = smollm2_tokenizer()
    vcfg, label = vila_model(tokenizer)
    print(f"model {label}: {vcfg.vision.image_size} px, {vcfg.tokens_per_image} tokens per image; tokenizer SmolLM2 "
          f"(<image> = {vcfg.image_token_id}); 7B step UNMEASURED, estimated at {args.gpus} GPUs x "
          f"{args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g} (assumptions); {load()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = os.path.join(tmp, "easy_vqa")
            easy_vqa.build(data, ["train"], limit=args.limit, progress=False)
        files = offline_files(data, tmp)
        for fmt in args.format:
            for workers in args.workers:
                c = stage_config(fmt, files, workers, args.text_share, args.max_images)
                config = data_config(c.data, vcfg, tokenizer, mode=c.train.objective, seed=c.train.seed)
                r = measure(config, tokenizer, vcfg.image_token_id, args.seconds)
                est = step_estimate(vcfg, c, r["samples_per_batch"], args.gpus, args.peak_tflops, args.mfu)
                r.update(format=fmt, stage=STAGE[fmt], workers=workers, step=est, max_images=c.data.max_images,
                         shape=f"{c.data.batch_size} x {c.data.seq_len}, max_images {c.data.max_images}, "
                               f"grad_accum {c.train.grad_accum}")
                results.append(r)
                print(f"{fmt} ({STAGE[fmt]}: {r['shape']}), workers={workers}: {r['samples_per_s']:.1f} samples/s, "
                      f"{r['rows_per_s']:.1f} rows/s, {r['samples_per_batch']:.1f} samples/batch; non-padding "
                      f"{r['fill']:.1%} (image {r['fill_image']:.1%}, text {r['fill_text']:.1%}), rows used "
                      f"{r['rows_used']:.1%}, image slots used {r['image_slots_used']:.1%}; first batch "
                      f"{r['first_batch_s']:.1f} s, {r['samples']} samples in {r['batches']} batches, "
                      f"{r['skipped']} skipped; 7B step (estimate, unmeasured) {est['step_tflop']:.0f} TFLOP, "
                      f"{est['step_s']:.1f} s for {est['samples_per_step']:.0f} samples = "
                      f"{est['samples_per_s']:.1f} samples/s -> loader / step "
                      f"{r['samples_per_s'] / est['samples_per_s']:.1f}x; {load()}", flush=True)
    for r in results:
        need = r["step"]["samples_per_s"]
        case = f"vila_{r['stage']}_{r['format']}_workers={r['workers']}"
        case += f"_max_images={r['max_images']}" if args.max_images else ""
        print("RESULT " + json.dumps({
            "case": case, "value": round(r["samples_per_s"], 2),
            "baseline": round(need, 2), "ratio": round(r["samples_per_s"] / need, 2),
            "baseline_is": f"7B step samples/s, UNMEASURED estimate ({args.gpus} x {args.peak_tflops:g} TFLOP/s, "
                           f"MFU {args.mfu:g})",
            "non_padding": round(r["fill"], 4), "non_padding_text": round(r["fill_text"], 4),
            "non_padding_image": round(r["fill_image"], 4), "rows_per_s": round(r["rows_per_s"], 2),
            "samples_per_batch": round(r["samples_per_batch"], 2), "skipped": r["skipped"]}))


if __name__ == "__main__":
    main()
