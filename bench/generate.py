"""Generation benchmark: the KV-cache engine vs transformers' `generate` on SmolLM2-135M-Instruct (same GGUF
weights, fp32, CPU, same run).

Per batch size: prefill tokens/s (B * prompt / time to the first token) and decode tokens/s (B * (new - 1) / time
of the remaining steps). Ours: timed through the engine's `on_chunk` hook (called after the prefill and after the
decode loop, both synchronised). transformers: prefill = generate(max_new_tokens=1); decode = generate(new) minus
that, with min_new_tokens = new so neither side stops early (our side has no EOS ids). Both are greedy, measured
after a warm-up run (compilation excluded), median of --reps. transformers runs with 1 and with 2 torch threads
and the faster one is the baseline (2 threads is ~10x slower when other processes share the cores).

    python bench/generate.py                              # B = 1, 8, 32; prompt 64, 128 new tokens
    python bench/generate.py --batches 1 8 --new 64 --reps 1

The batch-1 roofline is the weights' bytes (all read once per token) over the read bandwidth of a jitted sum over
1 GiB, measured in the same run. Ends with one `RESULT {json}` line per measured case (value = ours, baseline =
transformers, ratio = ours / theirs) and one for the batch-1 decode's fraction of the roofline.

--recaption: the VILA^2 recaption job on the SmolLM2 VLM (bench/recaption_common.py: SmolLM2-135M + the demo's 64 px
tower, fp32; easy-vqa train images, the recipe's three prompts, sampling T 0.7 / top-p 0.9, EOS allowed, --new max
new tokens). Per --batches b: ours = `generate_dataset` with continuous batching over b slots (timed after an
untimed warm-up run, median of --reps, default 1), transformers = `generate` in batches of b on the same weights and
inputs, timed with 1 and 2 torch threads (--torch-threads), the faster being the baseline as above
(OMP_WAIT_POLICY=PASSIVE unless set). Images/s, and generated tokens/s (kept tokens, EOS excluded, summed over
requests / wall time), and the CPU-seconds-per-image ratio (theirs / ours: less sensitive to other processes on a
shared host than the wall-clock ratio, but blind to how well each side uses its cores). The two sides sample with
different generators, so their output lengths differ: both means are printed. Finished slot-steps (decode steps x
rows spent on rows already done), from our outputs' lengths (`vlmjax.generate.slot_waste`: the static engine in
batches of b, and continuous batching over b slots, checked against the engine's own count), and transformers'
static batches from its lengths. Batch 1 takes --images-at-1 images (its rate settles quickly; it is the slowest per
image). One `RESULT` line per case and batch: recaption_images_s_b{b}, recaption_tok_s_b{b} (baseline transformers)
and recaption_finished_fraction_b{b} (value continuous, baseline static, same outputs).

    python bench/generate.py --recaption                  # b = 1, 8, 32; 32 images (8 at b = 1), 128 new
    python bench/generate.py --recaption --images 32 --batches 1 8 32 --new 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def ours_timings(model, prompts, new: int, weights: str = "float32") -> tuple[float, float]:
    from vlmjax.generate import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=new, chunk_steps=new, pad_to=64, weights=weights)
    marks = []
    t0 = time.perf_counter()
    out = generate(model, prompts, cfg, on_chunk=lambda step: marks.append(time.perf_counter()))
    assert all(len(o.tokens) == new for o in out)
    return marks[0] - t0, marks[-1] - marks[0]


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes/s of a jitted sum over a `gib` GiB fp32 array (bigger than any cache): the roofline's memory speed."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * (1 << 30)) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return x.nbytes / statistics.median(times)


def hf_timings(ref, ids, new: int, threads: int) -> tuple[float, float]:
    import torch

    torch.set_num_threads(threads)
    x = torch.tensor(ids)
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        ref.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = ref.generate(x, max_new_tokens=new, min_new_tokens=new, **kw)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new
    prefill = t1 - t0
    return prefill, (t2 - t1) - prefill


def recaption(args) -> None:
    """--recaption (module docstring)."""
    import dataclasses

    import jax
    import torch

    from recaption_common import SAMPLING, hf_llava, hf_recaption, ours_recaption, vila2_requests, vlm
    from vlmjax.generate import GenerationConfig, SamplingConfig, default_eos_ids
    from vlmjax.generate.slot_waste import continuous_slot_stats, sampled_tokens, static_slot_stats

    sampling = dict(SAMPLING, temperature=args.temperature, top_p=args.top_p)
    reps = args.reps or 1
    model, cfg, tok = vlm()
    n_max = max(args.images_at_1 if b == 1 else args.images for b in args.batches)
    all_reqs = vila2_requests(n_max)
    ref = hf_llava(model, tok)
    gc = GenerationConfig(max_new_tokens=args.new, sampling=SamplingConfig(**sampling), seed=0,
                          eos_token_ids=default_eos_ids(tok, cfg))
    rows = []
    for b in args.batches:
        reqs = all_reqs[: args.images_at_1 if b == 1 else args.images]
        ours = ours_recaption(model, tok, reqs, dataclasses.replace(gc, slots=b), batch_size=b, reps=reps)
        good = [r for r in ours["records"] if "error" not in r]
        if len(good) < len(reqs):  # an image that failed to load: counted, left out of the token counts
            print(f"b={b}: {len(reqs) - len(good)} of {len(reqs)} requests failed: "
                  f"{[r['error'] for r in ours['records'] if 'error' in r][:3]}", flush=True)
        sampled = [sampled_tokens(r["num_tokens"], r["finish_reason"]) for r in good]
        cont, engine = continuous_slot_stats(sampled, b), ours["stats"]
        if (cont["slot_steps"], cont["finished_slot_steps"]) != (engine["slot_steps"], engine["finished_slot_steps"]):
            print(f"b={b}: WARNING the count from lengths {cont} differs from the engine's {engine}", flush=True)
        hf = {}
        for threads in args.torch_threads:
            torch.set_num_threads(threads)
            hf[threads] = hf_recaption(ref, tok, cfg, reqs, batch=b, new=args.new, reps=reps, sampling=sampling)
            print(f"b={b}: transformers {threads} threads {len(reqs) / hf[threads]['seconds']:.3f} images/s",
                  flush=True)
        threads = min(hf, key=lambda t: hf[t]["seconds"])
        hf = hf[threads]
        row = dict(batch=b, images=len(reqs), failed=len(reqs) - len(good),
                   ours_ips=len(good) / ours["seconds"], hf_ips=len(reqs) / hf["seconds"],
                   ours_tps=sum(r["num_tokens"] for r in good) / ours["seconds"],
                   hf_tps=sum(hf["lengths"]) / hf["seconds"],
                   ours_mean=float(np.mean([r["num_tokens"] for r in good])), hf_mean=float(np.mean(hf["lengths"])),
                   ours_at_cap=float(np.mean([r["finish_reason"] == "length" for r in good])),
                   static=static_slot_stats(sampled, b)["finished_fraction"], continuous=cont["finished_fraction"],
                   engine=engine["finished_fraction"],
                   hf_static=static_slot_stats(hf["sampled"], b)["finished_fraction"],
                   decode_steps=cont["decode_steps"], prefill_calls=cont["prefill_calls"], threads=threads,
                   cpu_ratio=(hf["cpu_seconds"] / len(reqs)) / (ours["cpu_seconds"] / len(good)))
        rows.append(row)
        print(f"b={b}: ours {row['ours_ips']:.3f} images/s {row['ours_tps']:.1f} tok/s (mean {row['ours_mean']:.1f} "
              f"tokens, {ours['cpu_seconds'] / len(good):.2f} CPU s/image) | transformers {row['hf_ips']:.3f} "
              f"images/s {row['hf_tps']:.1f} tok/s (mean {row['hf_mean']:.1f}, {hf['cpu_seconds'] / len(reqs):.2f} "
              f"CPU s/image) | finished slot-steps: static {row['static']:.3f}, continuous {row['continuous']:.3f} "
              f"(engine {row['engine']:.3f}), transformers {row['hf_static']:.3f}", flush=True)

    print(f"\nVILA^2 recaption, SmolLM2-135M + 64 px tower fp32, {jax.default_backend()}, {args.new} new tokens max, "
          f"T {sampling['temperature']} / top-p {sampling['top_p']}; transformers with its faster thread count")
    print(f"{'batch':>5} {'images':>6} | {'ours img/s':>10} {'hf img/s':>8} {'x':>5} | {'ours tok/s':>10} "
          f"{'hf tok/s':>8} {'x':>5} | {'CPU x':>5} | {'mean tokens':>11} | {'finished: static':>16} {'contin.':>7} "
          f"{'hf':>5}")
    for r in rows:
        print(f"{r['batch']:>5} {r['images']:>6} | {r['ours_ips']:>10.3f} {r['hf_ips']:>8.3f} "
              f"{r['ours_ips'] / r['hf_ips']:>5.2f} | {r['ours_tps']:>10.1f} {r['hf_tps']:>8.1f} "
              f"{r['ours_tps'] / r['hf_tps']:>5.2f} | {r['cpu_ratio']:>5.2f} | "
              f"{r['ours_mean']:>5.0f}/{r['hf_mean']:<5.0f} | {r['static']:>16.3f} {r['continuous']:>7.3f} "
              f"{r['hf_static']:>5.3f}")
    for r in rows:
        extra = dict(images=r["images"], new=args.new, slots=r["batch"], failed=r["failed"],
                     mean_tokens_ours=round(r["ours_mean"], 1), mean_tokens_transformers=round(r["hf_mean"], 1),
                     torch_threads=r["threads"], cpu_ratio=round(r["cpu_ratio"], 4))
        for case, v, base, unit in (("images_s", r["ours_ips"], r["hf_ips"], "images/s"),
                                    ("tok_s", r["ours_tps"], r["hf_tps"], "generated tok/s")):
            print("RESULT " + json.dumps(dict(case=f"recaption_{case}_b{r['batch']}", value=round(v, 4),
                                              baseline=round(base, 4), ratio=round(v / base, 4), unit=unit, **extra)))
        print("RESULT " + json.dumps(dict(
            case=f"recaption_finished_fraction_b{r['batch']}", value=round(r["continuous"], 4),
            baseline=round(r["static"], 4), ratio=round(r["continuous"] / r["static"], 4) if r["static"] else None,
            unit="decode slot-steps on finished rows / all (value continuous, baseline static)",
            engine_count=round(r["engine"], 4), transformers_static=round(r["hf_static"], 4),
            at_cap_fraction=round(r["ours_at_cap"], 4), decode_steps=r["decode_steps"],
            prefill_calls=r["prefill_calls"], **extra)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--new-at-32", type=int, default=None, help="fewer new tokens at batch 32 (default: --new)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 2; --recaption 1)")
    p.add_argument("--recaption", action="store_true", help="the VILA^2 recaption job (module docstring)")
    p.add_argument("--images", type=int, default=32,
                   help="--recaption: easy-vqa images per batch size (continuous batching differs from static batches "
                        "only when this is well above the slots)")
    p.add_argument("--images-at-1", type=int, default=8, help="--recaption: images at batch 1")
    p.add_argument("--temperature", type=float, default=0.7, help="--recaption")
    p.add_argument("--top-p", type=float, default=0.9, help="--recaption")
    p.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                   help="--recaption: transformers' thread counts to time (the faster is the baseline)")
    args = p.parse_args(argv)
    if args.recaption:
        # torch's OpenMP threads spin-wait by default, which slows it on shared cores (perf-notes: passive is fair);
        # read when torch loads, which is later
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        recaption(args)
        return 0
    args.reps = args.reps or 2

    import jax
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from vlmjax.convert.gguf import load_gguf, smollm2_gguf_path

    path = smollm2_gguf_path()
    model, cfg = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    rows = []
    # every decode step reads all weights once (the tied embedding doubles as the LM head)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    bw = read_bandwidth()
    print(f"read bandwidth (jitted sum over 1 GiB): {bw / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB -> "
          f"batch-1 roofline {bw / weight_bytes:.1f} tok/s", flush=True)
    for b in args.batches:
        new = args.new_at_32 if (b >= 32 and args.new_at_32) else args.new
        ids = rng.integers(100, 40000, size=(b, args.prompt)).astype(np.int64)
        prompts = ids.tolist()
        ours_timings(model, prompts, new)  # compile
        ours = [ours_timings(model, prompts, new) for _ in range(args.reps)]
        hf = {}
        for threads in (1, 2):
            hf_timings(ref, ids[:, :8], 2, threads)  # warm-up
            hf[threads] = [hf_timings(ref, ids, new, threads) for _ in range(args.reps)]
        med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
        o_pre, o_dec = b * args.prompt / med(ours, 0), b * (new - 1) / med(ours, 1)
        best = max(hf, key=lambda t: b * (new - 1) / med(hf[t], 1))
        h_pre, h_dec = b * args.prompt / med(hf[best], 0), b * (new - 1) / med(hf[best], 1)
        rows.append(dict(batch=b, new=new, ours_prefill=o_pre, ours_decode=o_dec, hf_prefill=h_pre, hf_decode=h_dec,
                         hf_threads=best))
        print(f"B={b}: ours prefill {o_pre:.0f} tok/s decode {o_dec:.1f} tok/s | transformers ({best} thr) "
              f"prefill {h_pre:.0f} tok/s decode {h_dec:.1f} tok/s", flush=True)

    print(f"\nSmolLM2-135M fp32, {jax.default_backend()} ({jax.device_count()} device), prompt {args.prompt}, greedy")
    print(f"{'batch':>5} {'new':>4} | {'ours prefill':>12} {'hf prefill':>10} {'x':>5} | {'ours decode':>11} "
          f"{'hf decode':>9} {'x':>5}  (tok/s)")
    for r in rows:
        print(f"{r['batch']:>5} {r['new']:>4} | {r['ours_prefill']:>12.0f} {r['hf_prefill']:>10.0f} "
              f"{r['ours_prefill'] / r['hf_prefill']:>5.2f} | {r['ours_decode']:>11.1f} {r['hf_decode']:>9.1f} "
              f"{r['ours_decode'] / r['hf_decode']:>5.2f}")
    roof = bw / weight_bytes
    for r in rows:
        if r["batch"] == 1:
            print(f"batch 1 decode: {r['ours_decode']:.1f} tok/s = {r['ours_decode'] / roof:.0%} of the {roof:.1f} tok/s "
                  f"roofline (transformers: {r['hf_decode'] / roof:.0%})")
            print("RESULT " + json.dumps(dict(case="smollm2_135m_fp32_decode_b1_roofline_fraction",
                                              value=round(r["ours_decode"] / roof, 3), baseline=1.0,
                                              ratio=round(r["ours_decode"] / roof, 3))))
    for r in rows:
        for kind in ("prefill", "decode"):
            v, base = r[f"ours_{kind}"], r[f"hf_{kind}"]
            print("RESULT " + json.dumps(dict(case=f"smollm2_135m_fp32_{kind}_tok_s_b{r['batch']}", value=round(v, 2),
                                              baseline=round(base, 2), ratio=round(v / base, 3))))
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
