"""Kernel ceilings: how fast the matmuls alone can go on this machine, for the SmolLM2-135M steps the other benches
time. A step cannot beat the kernels it is made of, so these bound the ratios `train_step.py` and `generate.py`
can reach (XLA:CPU and torch side by side, same run, fp32, medians).

  train   every matmul of one decoder layer's forward and backward at 1024 tokens (batch 4 x 256): x @ W, dy @ W^T
          and x^T @ dy for q, k, v, o, gate, up, down, plus one 8192-wide chunk of the LM head. Reported: each
          library's FLOP-weighted rate over the step's matmul mix (time-weighted harmonic mean), and that rate over
          the 2048^2 peak = the MFU a step made of nothing but these matmuls would reach.
  decode  one decode step's weight stream at batch B: the 30 layers' 7 matmuls of (B, 576) activations with
          distinct weights (538 MB with the tied LM head, bigger than any cache), jitted as one program with a
          dependency chain like the model's. Reported: tokens/s = B / step time, and the read bandwidth it
          streams at vs a jitted sum over 1 GiB.

    python bench/kernels.py                 # both; decode at B = 1 and 8
    python bench/kernels.py --reps 5 --decode-batches 8

Ends with `RESULT {json}` lines: train_matmul_gflops (value = XLA, baseline = torch), train_matmul_mfu_ceiling
(value = XLA's mix rate / peak, baseline = torch's), decode_matmul_stream_b{B} (value = tokens/s of the bare
weight stream, baseline = the bandwidth roofline B * bandwidth / bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

D, F, H, KV, HD, L, V = 576, 1536, 9, 3, 64, 30, 49152  # SmolLM2-135M
LAYER = [(D, H * HD), (D, KV * HD), (D, KV * HD), (H * HD, D), (D, F), (D, F), (F, D)]  # (in, out) per matmul


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_mix(reps: int, tokens: int = 1024) -> dict:
    """-> {lib: (GFLOP/s over the mix, peak GFLOP/s)}; the LM head chunk counts V / 8192 times, like the step."""
    import jax
    import jax.numpy as jnp
    import torch

    shapes = [(k, n, 1) for k, n in LAYER] + [(D, 8192, V / 8192 / L)]  # (in, out, weight per layer)
    rng = np.random.default_rng(0)
    out = {}
    for lib in ("xla", "torch"):
        if lib == "xla":
            mm = {"fwd": jax.jit(lambda x, w: x @ w), "dx": jax.jit(lambda dy, w: dy @ w.T),
                  "dw": jax.jit(lambda x, dy: x.T @ dy)}
            put = jnp.asarray
            run = lambda f, *a: f(*a).block_until_ready()  # noqa: E731
        else:
            mm = {"fwd": lambda x, w: x @ w, "dx": lambda dy, w: dy @ w.T, "dw": lambda x, dy: x.T @ dy}
            put = torch.from_numpy
            run = lambda f, *a: f(*a)  # noqa: E731
        flops = secs = 0.0
        for k, n, weight in shapes:
            x, w, dy = (put(rng.standard_normal(s, dtype=np.float32)) for s in ((tokens, k), (k, n), (tokens, n)))
            args = {"fwd": (x, w), "dx": (dy, w), "dw": (x, dy)}
            for kind, f in mm.items():
                t = _median_time(lambda: run(f, *args[kind]), reps)
                flops += weight * 2 * tokens * k * n
                secs += weight * t
        a, b = (put(rng.standard_normal((2048, 2048), dtype=np.float32)) for _ in range(2))
        peak = 2 * 2048**3 / _median_time(lambda: run(mm["fwd"], a, b), reps)
        out[lib] = (flops / secs / 1e9, peak / 1e9)
    return out


def decode_stream(batch: int, reps: int) -> tuple[float, float]:
    """-> (tokens/s of the bare weight stream at `batch`, bytes read per step)."""
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    ws = [[jax.random.normal(jax.random.fold_in(key, 7 * i + j), s, jnp.float32) * 0.02 for j, s in enumerate(LAYER)]
          for i in range(L)]
    emb = jax.random.normal(key, (V, D), jnp.float32) * 0.02

    def step(x, ws, emb):
        for q, k, v, o, g, u, dn in ws:  # data dependencies like a decoder layer's, no attention or norms
            x = x + ((x @ q) * jnp.sum(x @ k + x @ v, -1, keepdims=True)) @ o
            x = x + (jax.nn.silu(x @ g) * (x @ u)) @ dn
            x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
        return x @ emb.T

    f = jax.jit(step)
    x = jnp.ones((batch, D), jnp.float32)
    t = _median_time(lambda: f(x, ws, emb).block_until_ready(), reps)
    nbytes = sum(w.nbytes for layer in ws for w in layer) + emb.nbytes
    return batch / t, nbytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--decode-batches", type=int, nargs="*", default=[1, 8])
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    results = []
    mix = train_mix(args.reps)
    (xr, xp), (tr, tp) = mix["xla"], mix["torch"]
    print(f"train matmul mix (1024 tokens, fwd + dx + dw of every SmolLM2 layer matmul + LM head share):\n"
          f"  XLA   {xr:.0f} GFLOP/s (2048^2 peak {xp:.0f}) -> at most {xr / xp:.0%} MFU\n"
          f"  torch {tr:.0f} GFLOP/s (2048^2 peak {tp:.0f}) -> at most {tr / tp:.0%} MFU")
    results.append(dict(case="train_matmul_gflops", value=round(xr, 1), baseline=round(tr, 1), ratio=round(xr / tr, 3)))
    peak = max(xp, tp)
    results.append(dict(case="train_matmul_mfu_ceiling", value=round(xr / peak, 3), baseline=round(tr / peak, 3),
                        ratio=round(xr / tr, 3)))

    from generate import read_bandwidth  # bench/generate.py's probe (this folder is on sys.path)

    bw = read_bandwidth()
    for b in args.decode_batches:
        tps, nbytes = decode_stream(b, args.reps)
        roof = b * bw / nbytes
        print(f"decode weight stream B={b}: {tps:.1f} tok/s = {tps / b * nbytes / 1e9:.1f} GB/s of the "
              f"{bw / 1e9:.1f} GB/s read bandwidth ({tps / roof:.0%} of the {roof:.1f} tok/s roofline)")
        results.append(dict(case=f"decode_matmul_stream_b{b}", value=round(tps, 1), baseline=round(roof, 1),
                            ratio=round(tps / roof, 3)))
    for r in results:
        print("RESULT " + json.dumps(r))
    return 0


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vlmjax.runtime import tune_process

    tune_process()
    raise SystemExit(main())
