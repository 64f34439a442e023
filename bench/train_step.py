"""Training-step benchmark: vlmjax's own SFT and DPO steps vs the same steps in transformers + torch (CPU, fp32,
AdamW, same run, same weights, same token ids and pixels).

Model: SmolLM2-135M (real weights, offline GGUF) + a fresh small SigLIP-style tower (DEMO_TOWER: 64 px, patch 8,
4 layers of 192 -> 64 image tokens; or --tower siglip224: 224 px, patch 16 -> 196 image tokens) + mlp2x_gelu,
assembled with `assemble_vlm`, exported with `save_vlm` and loaded by transformers
(`AutoModelForImageTextToText`, LlavaForConditionalGeneration) so both sides start from identical weights.

Cases (all parameters trainable, AdamW, lr 1e-4 constant, clip 1.0, weight decay 0 on both sides):
  sft     B rows x S: one image per row (after an 8-token text prefix), random text tokens, loss on every text
          target. torch: model(..., labels) with labels[t + 1] = targets[t] where loss_mask[t] (HF shifts labels
          internally, so this is the same token-mean loss).
  dpo     B pairs = 2B rows (chosen rows [0, B), rejected [B, 2B), same prompt + image, different random replies
          in the second half of the row), sigmoid DPO (beta 0.1), reference = a frozen copy of the initial
          weights. vlmjax: make_train_step with dpo.reference='frozen_copy'. torch: one policy forward on the 2B
          rows with grad + a reference forward of a second model under no_grad.
  sft2b   the SFT step on exactly the DPO batch (2B rows, same loss mask): the yardstick for the DPO overhead.
  dpo_lora (only with --lora-rank R > 0) LoRA on the decoder linears, reference = adapter off; vlmjax only
          (no peft here), so it has no torch baseline.

vlmjax steps are jitted as `vlmjax.train.loop` does (donate params and optimizer state, out_shardings pinned,
optimizer state placed on the mesh) and timed after one compile call; every timed step blocks on its outputs.
torch: --warmup untimed steps, then --steps timed ones. Medians. torch runs with --torch-threads 2 and
OMP_WAIT_POLICY=PASSIVE (unless already set, or --omp-active): on a 2-core machine shared with other processes,
OpenMP's default spin-waiting made the same torch step 3-6x slower and burn 5x the CPU time (measured while
writing this script), which would flatter the ratio. XLA's CPU thread pool does not use OpenMP.

tokens/s = rows x seq_len / step time (every position goes through forward and backward; for DPO the 2B policy
rows; loss-masked token counts are printed separately). MFU = model FLOPs / step time / peak, with FLOPs:
decoder 6 x (decoder matmul params + unembedding) + causal attention per position (`loop.flops_per_token`),
forward-only (1/3 of that) for the DPO reference pass, 4 x instead of 6 x for the decoder matmuls when they are
frozen (LoRA: no weight grads), plus ViT + projector forward (x3 with backward when trainable). The peak is a
jitted 2048x2048 fp32 matmul measured in this run (at the start and after every case; the best is used, so
MFU is never flattered by a measurement taken at a busy moment).

    python bench/train_step.py                       # batch 4 x 256; sft 5 timed steps, dpo + sft2b 3
    python bench/train_step.py --steps 3 --steps-2b 2 --batch 2 --seq 128 --cases sft dpo --lora-rank 16

Ends with one `RESULT {json}` line per measured case (value = vlmjax tokens/s, baseline = torch tokens/s,
ratio = value / baseline) and `RESULT {"case": "dpo_over_sft2b", ...}`: value = vlmjax DPO step ms / vlmjax SFT
step ms on the same 2B rows, baseline = the same quotient for torch, ratio = value / baseline (lower is better
for this one; the FLOP-count ideal is printed beside it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import numpy as np

PREFIX = 8  # text tokens before the image in each row
TEXT_VOCAB = 49152  # SmolLM2's own vocabulary (the <image> id lies above it)


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load avg {a:.2f} {b:.2f} {c:.2f} (2 cores)" if os.cpu_count() == 2 else f"load avg {a:.2f} {b:.2f} {c:.2f} ({os.cpu_count()} cores)"


# ----------------------------------------------------------------------------------------------- batches


def _row_targets(ids_s: np.ndarray, image_token_id: int, train_from: int) -> tuple[np.ndarray, np.ndarray]:
    """targets[t] = ids[t + 1]; 0 (untrained) at the row end and where the next token is an image token."""
    s = ids_s.shape[0]
    tgt = np.zeros(s, np.int32)
    tgt[:-1] = ids_s[1:]
    mask = np.zeros(s, np.float32)
    mask[train_from : s - 1] = 1.0
    nxt_img = np.zeros(s, bool)
    nxt_img[:-1] = ids_s[1:] == image_token_id
    tgt[nxt_img] = 0
    mask[nxt_img] = 0.0
    return tgt, mask


def make_batches(rng, b: int, s: int, cfg) -> tuple[dict, dict]:
    """-> (sft batch with B rows, dpo batch with 2B rows), numpy, in vlmjax's batch layout."""
    t_img, img_id, v = cfg.tokens_per_image, cfg.image_token_id, cfg.vision
    if PREFIX + t_img + 2 >= s:
        raise SystemExit(f"--seq {s} too short for {PREFIX} prefix + {t_img} image tokens + text")
    px = lambda n: rng.uniform(-1, 1, (n, v.image_size, v.image_size, 3)).astype(np.float32)  # noqa: E731
    text = lambda n: rng.integers(0, TEXT_VOCAB, n, dtype=np.int32)  # noqa: E731

    def common(ids):
        rows = ids.shape[0]
        return dict(input_ids=ids, segment_ids=np.ones_like(ids), positions=np.broadcast_to(np.arange(s, dtype=np.int32), ids.shape).copy(),
                    image_rows=np.arange(rows, dtype=np.int32))

    # SFT: prefix, image, text; loss on every text target (the last image token predicts the first word).
    ids = np.stack([np.concatenate([text(PREFIX), np.full(t_img, img_id, np.int32), text(s - PREFIX - t_img)]) for _ in range(b)])
    tm = [_row_targets(r, img_id, 0) for r in ids]
    sft = dict(common(ids), targets=np.stack([t for t, _ in tm]), loss_mask=np.stack([m for _, m in tm]), pixel_values=px(b))

    # DPO: shared prompt (prefix, image, question) up to s // 2, then a chosen / rejected reply.
    half = max(s // 2, PREFIX + t_img + 1)
    prompts = [np.concatenate([text(PREFIX), np.full(t_img, img_id, np.int32), text(half - PREFIX - t_img)]) for _ in range(b)]
    chosen = [np.concatenate([p, text(s - half)]) for p in prompts]
    rejected = [np.concatenate([p, text(s - half)]) for p in prompts]
    ids2 = np.stack(chosen + rejected)
    tm = [_row_targets(r, img_id, half - 1) for r in ids2]
    pixels = px(b)
    dpo = dict(common(ids2), targets=np.stack([t for t, _ in tm]), loss_mask=np.stack([m for _, m in tm]),
               pixel_values=np.concatenate([pixels, pixels]))
    return sft, dpo


# ----------------------------------------------------------------------------------------------- FLOPs


def vit_forward_flops(cfg) -> float:
    """ViT layers that LLaVA runs + patch embedding + projector, forward, per image."""
    v = cfg.vision
    p = v.num_patches + (1 if v.has_cls else 0)
    d, f = v.hidden_size, v.intermediate_size
    patch = 2 * v.patch_size**2 * v.num_channels * d * v.num_patches
    layer = 2 * p * (4 * d * d + 2 * d * f) + 4 * p * p * d
    dl = cfg.llm.hidden_size
    proj = 2 * cfg.tokens_per_image * (d * dl + dl * dl)
    return patch + cfg.vision_layers_used * layer + proj


def step_flops(cfg, rows: int, s: int, n_images: int, *, ref_forward: bool, decoder_frozen: bool, vit_trainable: bool) -> float:
    from vlmjax.train.loop import flops_per_token

    dense6 = flops_per_token(cfg, 0)  # 6 x (decoder matmul params + unembedding)
    attn = flops_per_token(cfg, s) - dense6  # causal attention, fwd + bwd
    policy = (dense6 * (4 / 6 if decoder_frozen else 1.0) + attn) * rows * s
    vit = vit_forward_flops(cfg) * n_images * (3 if vit_trainable else 1)
    total = policy + vit
    if ref_forward:
        total += (dense6 + attn) / 3 * rows * s + vit_forward_flops(cfg) * n_images
    return total


def peak_flops(reps: int = 15) -> float:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts)


# ----------------------------------------------------------------------------------------------- vlmjax


def vlmjax_case(model, cfg_base, batch_np: dict, *, objective: str, steps: int, lr: float, lora_rank: int = 0):
    """Time the library's step as loop.py builds it. -> dict(times, compile_s, metrics per step, cpu, cache)."""
    import jax
    import jax.numpy as jnp

    from vlmjax import sharding as shd
    from vlmjax.train import optim as opt_lib
    from vlmjax.train.step import jit_train_step

    config = cfg_base()
    config.train.objective = objective
    config.train.steps = steps + 1
    config.optim.lr = lr
    config.optim.schedule = "constant"
    config.optim.warmup_steps = 0  # lr = peak from the first step, like the torch side
    config.dpo.loss = "dpo"
    if lora_rank:
        from vlmjax.models.lora import add_lora

        model = copy.deepcopy(model)
        add_lora(model, rank=lora_rank, alpha=config.lora.alpha, targets=config.lora.targets, seed=0)
        config.lora.rank = lora_rank
        config.train.trainable = ["lora_"]
        config.dpo.reference = "lora_off"
    else:
        config.dpo.reference = "frozen_copy"
    mesh = shd.make_mesh(**config.mesh.to_dict())
    rules = shd.DEFAULT_RULES
    shd.shard_module(model, mesh, rules)
    graphdef, trainable, rest = opt_lib.split_trainable(model, tuple(config.train.trainable))
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it; keep the model's own arrays alive
    ref_params = jax.tree.map(jnp.copy, trainable) if objective == "dpo" and config.dpo.reference == "frozen_copy" else None
    tx, _ = opt_lib.make_optimizer(config.optim, trainable, config.train.steps)
    opt_state = opt_lib.init_state(tx, trainable, mesh)  # as loop.py: moments sharded like their params
    step_fn = jit_train_step(graphdef, tx, config, trainable, opt_state)
    batch = shd.place_batch(shd.stack_batches([batch_np]), mesh)
    key = jax.random.key(0)
    n_trainable = sum(int(x.size) for x in jax.tree.leaves(trainable))

    mets, times = [], []
    cpu0 = os.times()
    with shd.use_mesh(mesh, rules):
        for i in range(steps + 1):
            key, sub = jax.random.split(key)
            t0 = time.perf_counter()
            trainable, opt_state, m = step_fn(trainable, rest, opt_state, batch, sub, ref_params)
            jax.block_until_ready((trainable, opt_state, m))
            dt = time.perf_counter() - t0
            mets.append({k: float(v) for k, v in jax.device_get(m).items()})
            if i == 0:
                compile_s = dt
                cpu0 = os.times()
            else:
                times.append(dt)
    cpu1 = os.times()
    try:
        cache = step_fn._cache_size()
    except Exception:  # noqa: BLE001
        cache = None
    del trainable, opt_state, ref_params
    return dict(times=times, compile_s=compile_s, metrics=mets, n_trainable=n_trainable, cache=cache,
                user_s=(cpu1.user - cpu0.user) / steps, sys_s=(cpu1.system - cpu0.system) / steps)


# ----------------------------------------------------------------------------------------------- torch


def torch_inputs(batch: dict):
    import torch

    ids = torch.from_numpy(batch["input_ids"]).long()
    px = torch.from_numpy(np.ascontiguousarray(batch["pixel_values"].transpose(0, 3, 1, 2)))
    am = torch.ones_like(ids)
    return ids, px, am


def hf_labels(batch: dict):
    """labels aligned to input_ids for HF's internal shift: labels[t + 1] = targets[t] where loss_mask[t]."""
    import torch

    tgt, mask = batch["targets"], batch["loss_mask"]
    lab = np.full_like(tgt, -100)
    lab[:, 1:] = np.where(mask[:, :-1] > 0, tgt[:, :-1], -100)
    return torch.from_numpy(lab).long()


def torch_case(hf_dir, batch: dict, *, objective: str, steps: int, warmup: int, lr: float, beta: float):
    import torch
    import torch.nn.functional as F
    import transformers

    transformers.utils.logging.disable_progress_bar()
    load_model = lambda: transformers.AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32)  # noqa: E731
    model = load_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids, px, am = torch_inputs(batch)
    n_trainable = sum(p.numel() for p in params)

    if objective == "sft":
        labels = hf_labels(batch)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, pixel_values=px, attention_mask=am, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return {"loss": loss.item()}
    else:
        ref = load_model().eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        tgt = torch.from_numpy(batch["targets"]).long()
        mask = torch.from_numpy(batch["loss_mask"])
        b = ids.shape[0] // 2

        def seq_logps(logits):
            nll = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view_as(mask)
            return (-nll * mask).sum(-1)

        def step():
            opt.zero_grad(set_to_none=True)
            pol = seq_logps(model(input_ids=ids, pixel_values=px, attention_mask=am).logits)
            with torch.no_grad():
                rl = seq_logps(ref(input_ids=ids, pixel_values=px, attention_mask=am).logits)
            margin = (pol[:b] - rl[:b]) - (pol[b:] - rl[b:])
            loss = -F.logsigmoid(beta * margin).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return {"loss": loss.item(), "logps/chosen": pol[:b].mean().item(), "logps/rejected": pol[b:].mean().item()}

    mets, times = [], []
    for i in range(warmup + steps):
        if i == warmup:
            cpu0 = os.times()
        t0 = time.perf_counter()
        mets.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    cpu1 = os.times()
    return dict(times=times, metrics=mets, n_trainable=n_trainable,
                user_s=(cpu1.user - cpu0.user) / steps, sys_s=(cpu1.system - cpu0.system) / steps)


# ----------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="SFT rows; DPO pairs (2 x batch rows)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per implementation for the B-row sft case")
    p.add_argument("--steps-2b", type=int, default=3, help="timed steps for the 2B-row cases (dpo, sft2b, dpo_lora)")
    p.add_argument("--warmup", type=int, default=1, help="untimed torch steps (vlmjax: the compile call)")
    p.add_argument("--cases", nargs="+", default=["sft", "dpo", "sft2b"], choices=["sft", "dpo", "sft2b"])
    p.add_argument("--lora-rank", type=int, default=0, help="> 0 adds the dpo_lora case (vlmjax only)")
    p.add_argument("--tower", choices=["demo", "siglip224"], default="demo")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--omp-active", action="store_true",
                   help="leave OpenMP's default spin-waiting on (torch); see OMP_WAIT_POLICY above")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if not args.omp_active:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP runtime starts: set it first

    import jax
    import torch

    from vlmjax.convert.assemble import assemble_vlm
    from vlmjax.convert.gguf import smollm2_gguf_path
    from vlmjax.convert.hf import save_vlm
    from vlmjax.demo import DEMO_TOWER
    from vlmjax.models.config import VisionConfig
    from vlmjax.train.defaults import base

    torch.set_num_threads(args.torch_threads)
    print(f"start: {load()}; jax {jax.__version__} {jax.devices()[0].platform} x{jax.device_count()}, torch "
          f"{torch.__version__} threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}",
          flush=True)
    tower = DEMO_TOWER if args.tower == "demo" else VisionConfig(
        kind="siglip", image_size=224, patch_size=16, hidden_size=192, intermediate_size=768, num_layers=4, num_heads=3,
        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    model, cfg, tok = assemble_vlm(smollm2_gguf_path(), tower, projector="mlp2x_gelu")
    tmp = tempfile.TemporaryDirectory(prefix="vlmjax_bench_train_")
    hf_dir = save_vlm(model, os.path.join(tmp.name, "hf"), tokenizer=tok)
    b, s = args.batch, args.seq
    sft_np, dpo_np = make_batches(np.random.default_rng(0), b, s, cfg)
    print(f"model: SmolLM2-135M (GGUF) + {cfg.vision.kind} tower {cfg.vision.image_size}px/{cfg.vision.patch_size} "
          f"({cfg.vision.num_layers} layers x {cfg.vision.hidden_size}) + {cfg.projector}; {cfg.tokens_per_image} image "
          f"tokens/row, vocab {cfg.llm.vocab_size}; batch {b} x {s} (DPO {2 * b} rows); loss tokens: sft "
          f"{int(sft_np['loss_mask'].sum())}, dpo/sft2b {int(dpo_np['loss_mask'].sum())}", flush=True)

    peaks = [peak_flops()]  # measured again after every case; the best one is the ceiling MFU is quoted against
    print(f"peak: jitted 2048x2048 fp32 matmul = {peaks[0] / 1e9:.0f} GFLOP/s ({load()})", flush=True)

    n_img = lambda bt: bt["pixel_values"].shape[0]  # noqa: E731
    specs = {  # case -> (objective, batch, flop kwargs)
        "sft": ("sft", sft_np, dict(ref_forward=False, decoder_frozen=False, vit_trainable=True)),
        "dpo": ("dpo", dpo_np, dict(ref_forward=True, decoder_frozen=False, vit_trainable=True)),
        "sft2b": ("sft", dpo_np, dict(ref_forward=False, decoder_frozen=False, vit_trainable=True)),
    }
    cases = list(args.cases) + (["dpo_lora"] if args.lora_rank else [])
    results, rows = {}, []
    for case in cases:
        if case == "dpo_lora":
            objective, batch, fkw = "dpo", dpo_np, dict(ref_forward=True, decoder_frozen=True, vit_trainable=False)
        else:
            objective, batch, fkw = specs[case]
        nrows = batch["input_ids"].shape[0]
        flops = step_flops(cfg, nrows, s, n_img(batch), **fkw)
        steps = args.steps if case == "sft" else args.steps_2b
        ours = vlmjax_case(model, base, batch, objective=objective, steps=steps, lr=args.lr,
                           lora_rank=args.lora_rank if case == "dpo_lora" else 0)
        print(f"[{case}] vlmjax: compile+first step {ours['compile_s']:.1f}s, steps {[round(t, 2) for t in ours['times']]}, "
              f"cpu/step user {ours['user_s']:.1f}s sys {ours['sys_s']:.1f}s, jit cache entries {ours['cache']}, "
              f"trainable {ours['n_trainable'] / 1e6:.2f}M ({load()})", flush=True)
        theirs = None
        if case != "dpo_lora":
            theirs = torch_case(hf_dir, batch, objective=objective, steps=steps, warmup=args.warmup, lr=args.lr, beta=0.1)
            print(f"[{case}] torch: steps {[round(t, 2) for t in theirs['times']]}, cpu/step user {theirs['user_s']:.1f}s "
                  f"sys {theirs['sys_s']:.1f}s, trainable {theirs['n_trainable'] / 1e6:.2f}M ({load()})", flush=True)
            keys = ["loss"] + (["logps/chosen", "logps/rejected"] if objective == "dpo" else [])
            for k in keys:
                a, c = ours["metrics"][0][k], theirs["metrics"][0][k]
                print(f"[{case}] first-step {k}: vlmjax {a:.6f}  torch {c:.6f}  |diff| {abs(a - c):.2e}"
                      f" (rel {abs(a - c) / max(abs(c), 1e-12):.1e})")
            print(f"[{case}] loss by step: vlmjax {[round(m['loss'], 5) for m in ours['metrics']]}  torch "
                  f"{[round(m['loss'], 5) for m in theirs['metrics']]}")
        results[case] = (ours, theirs, flops)
        for impl, r in (("vlmjax", ours), ("torch", theirs)):
            if r is not None:
                rows.append((case, impl, statistics.median(r["times"])))
        peaks.append(peak_flops())
        print(f"peak again: {peaks[-1] / 1e9:.0f} GFLOP/s", flush=True)
    peak = max(peaks)

    print(f"\nbatch {b} x {s} (DPO: {b} pairs = {2 * b} rows), fp32, AdamW; medians of {args.steps} (sft) / "
          f"{args.steps_2b} (2B-row cases) timed steps; tokens = rows x seq; MFU against the best matmul peak of this "
          f"run, {peak / 1e9:.0f} GFLOP/s (all: {[round(x / 1e9) for x in peaks]}); {load()}")
    print("| case | impl | tokens/s | step ms | MFU | GFLOP/step |")
    print("|---|---|---|---|---|---|")
    for case, impl, t in rows:
        nrows = b if case == "sft" else 2 * b
        flops = results[case][2]
        print(f"| {case} | {impl} | {nrows * s / t:.0f} | {t * 1e3:.0f} | {flops / t / peak * 100:.1f}% | {flops / 1e9:.0f} |")

    out = []
    med = lambda r: statistics.median(r["times"])  # noqa: E731
    for case, (ours, theirs, _) in results.items():
        nrows = (2 * b) if case != "sft" else b
        v = nrows * s / med(ours)
        bl = nrows * s / med(theirs) if theirs else None
        out.append({"case": f"{case}_tokens_per_s", "value": round(v, 1), "baseline": None if bl is None else round(bl, 1),
                    "ratio": None if bl is None else round(v / bl, 3)})
    if "dpo" in results and "sft2b" in results:
        q_ours = med(results["dpo"][0]) / med(results["sft2b"][0])
        q_theirs = med(results["dpo"][1]) / med(results["sft2b"][1])
        ideal = results["dpo"][2] / results["sft2b"][2]
        print(f"\nDPO overhead: DPO step ms / SFT step ms on the same {2 * b} rows (policy fwd+bwd + reference fwd vs "
              f"fwd+bwd): vlmjax {q_ours:.3f}, torch {q_theirs:.3f}, FLOP-count ideal {ideal:.3f}")
        out.append({"case": "dpo_over_sft2b", "value": round(q_ours, 3), "baseline": round(q_theirs, 3),
                    "ratio": round(q_ours / q_theirs, 3)})
    print(f"total {time.perf_counter() - t_start:.0f}s; end: {load()}")
    for o in out:
        print("RESULT " + json.dumps(o))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
