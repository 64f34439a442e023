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
"""

from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--new-at-32", type=int, default=None, help="fewer new tokens at batch 32 (default: --new)")
    p.add_argument("--reps", type=int, default=2)
    args = p.parse_args(argv)

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
