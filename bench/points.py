"""POINTS bench (issue 18): perplexity scoring throughput and the memory of a model soup, CPU, fp32.

Model: the SmolLM2 VLM of bench/jobs.py (SmolLM2-135M-Instruct + the demo's small SigLIP-style tower, 64 image
tokens, mlp2x_gelu), built and exported with its helpers.

  score  `scoring.score_dataset` pairs/s at batch 1 and 32 over --pairs easy-vqa train images with their captions
         ("A blue circle.", recovered from the questions), as `filter score` asks: the caption teacher-forced as the
         reply to "please generate a caption for this image." (ChatML). Baseline: a transformers loop in the style
         of WePOINTS' scripts/pretrain_filtering_with_ppl.py on the same weights exported as HF LLaVA: one pair per
         forward (batch 1), softmax over the full vocabulary, the caption tokens' probabilities gathered, PPL =
         exp(-mean log p); fp32 (the reference's bf16 rounding is a bug not copied), same token ids and pixels
         (our Encoder). Encoding is inside both timings. Median of --reps timed runs after an untimed one
         (compilation excluded). Also the largest relative PPL difference between the two.
  soup   a uniform soup of 4 SmolLM2-size native checkpoints (the model with a different small offset per copy),
         each way in its own process: `convert average` to a native folder (streaming), `average_into` an
         in-memory model (greedy soup's trial; growth measured after the model is loaded), and the reference's
         way (WePOINTS model_soup.py: every state dict loaded, then summed). Seconds and peak RSS growth (VmHWM,
         which counts the safetensors files' mapped pages) plus peak anonymous-memory growth (RssAnon, sampled
         every 5 ms), in MB and in model sizes.

    python bench/points.py                       # full size (--pairs 512)
    python bench/points.py --pairs 64 --reps 1   # short run
    python bench/points.py --cases soup

The last line is `RESULT {json}` with every measure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jobs  # noqa: E402  (bench/jobs.py: the SmolLM2 VLM and the easy-vqa data)

CASES = ("score", "soup")


def caption_pool(n: int, folder: Path):
    """Caption records of the first n easy-vqa train images whose questions fix colour and shape."""
    from vlmjax.data.easy_vqa import caption, infer_attributes
    from vlmjax.data.pipeline import SourceSpec

    root = jobs.easy_vqa_root() / "train"
    by_image: dict[int, list] = {}
    for q, a, image_id in json.loads((root / "questions.json").read_text()):
        by_image.setdefault(int(image_id), []).append((q, a))
    recs = []
    for image_id in sorted(by_image):
        attrs = infer_attributes(by_image[image_id])
        if attrs["shape"] and attrs["color"]:
            recs.append({"id": f"train_{image_id}", "image": f"{image_id}.png", "caption": caption(attrs)})
        if len(recs) == n:
            break
    path = folder / "caps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return SourceSpec(format="caption", path=str(path), image_root=str(root / "images"))


def score(args, out: dict) -> None:
    import torch
    import transformers

    from vlmjax.convert import hf
    from vlmjax.generate import Encoder
    from vlmjax.recipes.points.filter import caption_requests
    from vlmjax.scoring import score_dataset

    torch.set_num_threads(args.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="vlmjax_points_"))
    model, cfg, tok = jobs.vlm()
    reqs = caption_requests(caption_pool(args.pairs, tmp))
    ours = {}
    for b in (1, 32):
        times, cpus = [], []
        for rep in range(args.reps + 1):  # rep 0: warm-up (compiles)
            path = tmp / f"ours_b{b}_{rep}.jsonl"
            t0, c0 = time.perf_counter(), time.process_time()
            st = score_dataset(model, tok, reqs, path, batch_size=b, progress=False)
            if rep:
                times.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            assert st["written"] == len(reqs), st
        ours[b] = {json.loads(x)["id"]: json.loads(x)["perplexity"] for x in path.read_text().splitlines()}
        out[f"ours_b{b}_pairs_per_s"] = round(len(reqs) / statistics.median(times), 3)
        out[f"ours_b{b}_cpu_s_per_pair"] = round(statistics.median(cpus) / len(reqs), 4)
        print(f"score_dataset batch {b}: {out[f'ours_b{b}_pairs_per_s']} pairs/s, "
              f"{out[f'ours_b{b}_cpu_s_per_pair']} CPU s/pair", flush=True)

    folder = tmp / "hf"
    hf.save_vlm(model, folder, tokenizer=tok)
    del model
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    enc = Encoder(tok, cfg)

    def reference_loop() -> dict:
        ppl = {}
        for r in reqs:
            e = enc.scored(r)
            ids = torch.tensor([e.ids])
            with torch.no_grad():
                logits = ref(input_ids=ids, pixel_values=torch.tensor(e.pixels.transpose(0, 3, 1, 2))).logits
            probs = torch.softmax(logits[0, :-1].float(), dim=-1)  # the full vocabulary, as the reference
            p = probs.gather(-1, ids[0, 1:, None])[:, 0]
            mask = torch.tensor(np.asarray(e.target[1:]))
            ppl[r.id] = float(torch.exp(-torch.log(p[mask]).mean()))
        return ppl

    times, cpus = [], []
    for rep in range(args.reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        hf_ppl = reference_loop()
        if rep:
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    out["transformers_b1_pairs_per_s"] = round(len(reqs) / statistics.median(times), 3)
    out["transformers_b1_cpu_s_per_pair"] = round(statistics.median(cpus) / len(reqs), 4)
    for b in (1, 32):
        out[f"ratio_b{b}"] = round(out[f"ours_b{b}_pairs_per_s"] / out["transformers_b1_pairs_per_s"], 3)
        out[f"cpu_ratio_b{b}"] = round(out["transformers_b1_cpu_s_per_pair"] / out[f"ours_b{b}_cpu_s_per_pair"], 3)
    ids = sorted(hf_ppl)
    out["max_rel_ppl_diff"] = float(max(abs(ours[b][i] / hf_ppl[i] - 1) for b in (1, 32) for i in ids))
    out.update(pairs=len(reqs), torch_threads=args.torch_threads, reps=args.reps)
    print(f"transformers loop (batch 1, full softmax): {out['transformers_b1_pairs_per_s']} pairs/s; "
          f"max relative PPL difference {out['max_rel_ppl_diff']:.2e}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- soup


def _status(field: str) -> float:
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field)) / 1024


def soup_child(mode: str, folders: list[str], out_dir: str) -> None:
    """One process: (load the model for in_memory), reset the peak, soup the folders; print seconds and growth."""
    import gc

    from vlmjax.convert.average import average_folders, average_into, open_sources

    model = None
    if mode == "in_memory":
        from vlmjax.convert.native import load_folder

        model, _, _ = load_folder(folders[0])
    gc.collect()
    base, base_anon = _status("VmRSS:"), _status("RssAnon:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    peak_anon, done = [base_anon], threading.Event()

    def sample():
        while not done.wait(0.005):
            peak_anon[0] = max(peak_anon[0], _status("RssAnon:"))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "uniform":
        average_folders(folders, out_dir)
    elif mode == "in_memory":
        average_into(model, open_sources(folders))
    else:  # the reference's model_soup.py: every state dict in memory, summed, / N, saved
        from safetensors.numpy import load_file, save_file

        dicts = [load_file(str(Path(f) / "model.safetensors")) for f in folders]
        soup = {k: sum(d[k].astype(np.float32) for d in dicts) / len(dicts) for k in dicts[0]}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file(soup, str(Path(out_dir) / "model.safetensors"))
        del soup, dicts
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    th.join()
    print(json.dumps(dict(mode=mode, seconds=round(seconds, 3), cpu_s=round(cpu, 3), base_mb=round(base),
                          peak_growth_mb=round(_status("VmHWM:") - base),
                          peak_anon_growth_mb=round(max(peak_anon[0], _status("RssAnon:")) - base_anon))))


def soup(args, out: dict) -> None:
    import jax

    from vlmjax.convert.native import save_native

    tmp = Path(tempfile.mkdtemp(prefix="vlmjax_points_soup_"))
    model, _, tok = jobs.vlm()
    folders = []
    for k in range(args.ingredients):  # distinct checkpoints: every parameter + k * 1e-3
        if k:
            from flax import nnx

            for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
                var.set_value(jax.numpy.add(var[...], 1e-3))
        folders.append(str(save_native(model, tmp / f"ingredient{k}", tokenizer=tok, max_shard_bytes=1 << 40)))
    del model
    model_mb = sum(f.stat().st_size for f in Path(folders[0]).glob("*.safetensors")) / 2**20
    out.update(ingredients=len(folders), model_mb=round(model_mb))
    for mode in ("uniform", "in_memory", "reference"):
        res = subprocess.run([sys.executable, __file__, "--soup-child", mode, str(tmp / f"soup_{mode}"), *folders],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        got = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"soup {mode}: {got} (model {model_mb:.0f} MB)", flush=True)
        out[f"soup_{mode}_s"] = got["seconds"]
        out[f"soup_{mode}_cpu_s"] = got["cpu_s"]
        out[f"soup_{mode}_peak_growth_models"] = round(got["peak_growth_mb"] / model_mb, 2)
        out[f"soup_{mode}_peak_anon_growth_models"] = round(got["peak_anon_growth_mb"] / model_mb, 2)
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--pairs", type=int, default=512, help="score: caption pairs (easy-vqa train images)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--ingredients", type=int, default=4, help="soup: checkpoints averaged")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--soup-child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.soup_child:
        mode, out_dir, *folders = args.soup_child
        soup_child(mode, folders, out_dir)
        return 0
    import jax

    print(f"jax {jax.__version__} {jax.default_backend()} ({jax.device_count()} device); cases {args.cases}",
          flush=True)
    out, t0 = {}, time.time()
    for case in dict.fromkeys(args.cases):
        {"score": score, "soup": soup}[case](args, out)
    out["total_s"] = round(time.time() - t0)
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
