"""Attention benchmark: reference vs xla_flash (and any other impl) over sequence lengths.

Prints a table (impl, dtype, B, H, KV, S, D, forward ms, forward+backward ms, peak temp memory of the
fwd+bwd program) and one `RESULT {json}` line per measured comparison. Times are wall-clock medians over
a few reps after a warmup run; memory is XLA's compile-time `memory_analysis().temp_size_in_bytes`
(known before running, which is how over-budget reference runs are skipped).

Default case: B=1, H=8 query heads over 2 kv heads (GQA), D=64, fp32, causal, a packed row of samples
with random lengths and ~3% trailing padding: what an LLaVA training step sees.

    python bench/attention.py                       # full table, S = 512 .. 16384 (< 10 min on 2 cores)
    python bench/attention.py --sizes 4096 --impls xla_flash --blocks 256x512,512x512   # block sweep
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vlmjax.ops.attention import attention

GIB = 2**30


def packed_segments(s: int, seed: int = 0) -> np.ndarray:
    """(1, s) segment ids: samples of random length in [s/8, s/2], then ~3% trailing padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((1, s), np.int32)
    used, pos, sid = int(s * 0.97), 0, 1
    while pos < used:
        n = int(rng.integers(max(1, s // 8), max(2, s // 2)))
        seg[0, pos:min(pos + n, used)] = sid
        pos, sid = pos + n, sid + 1
    return seg


def time_call(compiled, args, budget_s: float, max_reps: int = 5) -> float:
    """Median ms over up to `max_reps` runs after one warmup; fewer reps for slow cases."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    reps = max(1, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_case(impl, s, *, b, h, kv, d, dtype, layout, block, mem_limit, budget_s):
    causal = layout != "bidirectional"
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, kv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kv, d)), dtype)
    seg = jnp.asarray(np.repeat(packed_segments(s), b, 0)) if layout == "packed" else None
    opts = {} if impl == "reference" or block is None else dict(block_q=block[0], block_k=block[1])
    fn = functools.partial(attention, segment_ids=seg, causal=causal, impl=impl, **opts)
    ct = jnp.asarray(rng.standard_normal((b, s, h, d)), dtype)

    def fwd_bwd(q, k, v):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    fwd_c = jax.jit(fn).lower(q, k, v).compile()
    fb_c = jax.jit(fwd_bwd).lower(q, k, v).compile()
    mem_fwd = fwd_c.memory_analysis().temp_size_in_bytes
    mem = fb_c.memory_analysis().temp_size_in_bytes
    row = dict(impl=impl, dtype=jnp.dtype(dtype).name, B=b, H=h, KV=kv, S=s, D=d, mem_fwd=mem_fwd, mem=mem,
               block=None if impl == "reference" else block, fwd_ms=None, fwdbwd_ms=None, note="")
    if mem > mem_limit:
        row["note"] = f"skipped: fwd+bwd temp estimate {mem / GIB:.1f} GiB > {mem_limit / GIB:.0f} GiB"
        return row
    row["fwd_ms"] = time_call(fwd_c, (q, k, v), budget_s)
    row["fwdbwd_ms"] = time_call(fb_c, (q, k, v), budget_s)
    return row


def default_block(impl: str) -> tuple:
    """The (block_q, block_k) an impl uses when none is given (read from its signature)."""
    from vlmjax.ops import attention as att

    params = inspect.signature(att._impl_fn(impl, decode=False)).parameters
    return tuple(params[n].default for n in ("block_q", "block_k") if n in params) or ("?",)


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def print_table(rows):
    head = f"{'impl':<10} {'dtype':<8} {'B':>2} {'H':>2} {'KV':>2} {'S':>6} {'D':>3} {'block':>8} " \
           f"{'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd temp':>10} {'fwd+bwd temp':>13}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        ms = lambda x: f"{x:9.1f}" if x is not None else f"{'-':>9}"
        blk = "-" if r["impl"] == "reference" else "x".join(map(str, r["block"] or default_block(r["impl"])))
        print(f"{r['impl']:<10} {r['dtype']:<8} {r['B']:>2} {r['H']:>2} {r['KV']:>2} {r['S']:>6} {r['D']:>3} "
              f"{blk:>8} {ms(r['fwd_ms'])} {ms(r['fwdbwd_ms']):>11} {fmt_bytes(r['mem_fwd']):>10} "
              f"{fmt_bytes(r['mem']):>13}  {r['note']}")


def result_lines(rows, base="reference"):
    """RESULT lines: every non-baseline impl against the baseline at the same S (time and memory)."""
    by = {(r["impl"], r["S"]): r for r in rows}
    for r in rows:
        ref = by.get((base, r["S"]))
        if r["impl"] == base or ref is None or r["fwdbwd_ms"] is None:
            continue
        cases = [
            (f"{r['impl']}_fwdbwd_ms_S{r['S']}", r["fwdbwd_ms"], ref["fwdbwd_ms"]),
            (f"{r['impl']}_fwd_ms_S{r['S']}", r["fwd_ms"], ref["fwd_ms"]),
            (f"{r['impl']}_fwdbwd_temp_bytes_S{r['S']}", r["mem"], ref["mem"]),  # ref estimate even if skipped
        ]
        for case, value, baseline in cases:
            ratio = None if baseline is None else round(value / baseline, 4)
            rounded = None if baseline is None else round(baseline, 3)
            print("RESULT " + json.dumps(dict(case=case, value=round(value, 3), baseline=rounded, ratio=ratio)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--impls", default="reference,xla_flash")
    p.add_argument("--blocks", default="default",
                   help="comma list of block_q x block_k for the fused impls; 'default' = the impl's own defaults")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layout", default="packed", choices=["packed", "causal", "bidirectional"],
                   help="packed: causal + packed segments (default); causal: one sample per row; "
                        "bidirectional: no mask (ViT)")
    p.add_argument("--mem-limit-gib", type=float, default=12.0, help="skip runs whose temp estimate exceeds this")
    p.add_argument("--budget-s", type=float, default=6.0, help="timing budget per measurement (sets reps)")
    a = p.parse_args()
    blocks = [None if blk == "default" else tuple(int(x) for x in blk.split("x")) for blk in a.blocks.split(",")]
    print(f"backend={jax.default_backend()} devices={jax.devices()} jax={jax.__version__} layout={a.layout}")
    rows = []
    for s in [int(x) for x in a.sizes.split(",")]:
        for impl in a.impls.split(","):
            for block in ([None] if impl == "reference" else blocks):
                r = bench_case(impl, s, b=a.batch, h=a.heads, kv=a.kv_heads, d=a.head_dim, dtype=jnp.dtype(a.dtype),
                               layout=a.layout, block=block, mem_limit=a.mem_limit_gib * GIB,
                               budget_s=a.budget_s)
                rows.append(r)
                print(f"# done {impl} S={s} block={block}: fwd={r['fwd_ms']} fwd+bwd={r['fwdbwd_ms']} ms",
                      flush=True)
    print()
    print_table(rows)
    print()
    result_lines(rows)


if __name__ == "__main__":
    main()
