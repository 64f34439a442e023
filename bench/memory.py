"""Per-device memory of the real train steps at LLaVA-1.5-7B scale, without GPUs and without weights.

Model: llava-hf/llava-1.5-7b-hf's config.json (CLIP ViT-L/14-336, 24 layers, feature layer -2; Vicuna-7B, 32
layers of 4096, text vocab 32064 with <image> = 32000; mlp2x_gelu projector), mapped by vlmjax.convert's
`vlm_config_from_hf`, with the STIC configs' execution knobs (bf16 compute, fp32 params, remat full on the LLM,
attention_impl auto). `vlmjax.train.aot.aot_memory` builds it with nnx.eval_shape, gives every parameter,
optimizer-state leaf and batch array the sharding the training loop gives it, jits the step as the loop does
(params + optimizer state donated) and reads `compiled.memory_analysis()` on 8 forced CPU devices:
  peak/device = arguments + outputs - aliased (donated, reused) + temps          (GiB = 2**30 bytes)

Cases (configs/stic/llava15_7b.py unless said otherwise; global batch 8 as there: one pair / sample per device
group and micro-batch, i.e. data.batch_size = data x fsdp devices, train.grad_accum = 8 / that, max_images 2 per
pair / sample, seq 2048; the step is compiled with that grad_accum, so it holds one micro-batch's activations):
  dpo_lora       stage1: STIC DPO (beta 0.1, alpha 1/1024), LoRA r128/alpha 256 on every LLM linear + projector
                 trainable, reference = adapter off, 2 rows (chosen, rejected) per pair
  dpo_lora_bf16  the same with model.param_dtype=bfloat16 (frozen base, adapters and Adam moments all bf16)
  dpo_lora_frozen_bf16  the same with model.frozen_param_dtype=bfloat16: the frozen base in bf16, the adapters,
                 projector and their Adam moments fp32
  sft_lora       stage2: description-infused SFT, same adapter, packed rows
  sft_full       stage2 with lora.rank=0 and train.trainable=(^llm/, ^projector/): full fine-tune, AdamW fp32
Meshes: fsdp1 (one device: the shipped config as is, batch 1 x grad_accum 8), fsdp4 (the first 4 devices: the
"4x A6000" target), fsdp8, fsdp4_tp2 (fsdp 4 x tensor 2).
Budget: 48 GiB per device (RTX A6000). XLA:CPU is a proxy for XLA:GPU (other fusion and scheduling, xla_flash
attention where a GPU picks pallas_gpu / cuDNN); see the printed caveats.

    python bench/memory.py                               # every case x mesh (20 compiles, ~25 s each)
    python bench/memory.py --cases dpo_lora --meshes fsdp4
    python bench/memory.py --no-licm                     # the same without XLA's loop-invariant code motion
    python bench/memory.py --model tiny                  # a scaled-down model: seconds (tests/test_memory_aot.py)
    python bench/memory.py --config configs/points/yi9b.py:sft --config configs/vila/llama2_7b.py:align \
        --meshes fsdp8 fsdp4                             # recipe configs' own steps (x meshes; default fsdp8)

--config FILE[:STAGE] (repeatable) compiles the step that training config runs, loaded by config_io (with --set
KEY=VALUE overrides): its projector (downsample / pixel shuffle), tiling and max_images, LoRA or full, trainable
regexes, dtypes, data.batch_size rows per micro-batch over the mesh's batch devices (the configs' batch is per
8-GPU host), grad_accum and seq_len as written. The model comes from the embedded config.json dicts in
bench/hf_configs.py: model.init=assemble builds model.llm + model.vision + the fresh projector as
vlmjax.convert.assemble does (<image> appended to the tokenizer, vocabulary padded to a multiple of 64); a stage
that starts from an earlier stage's export_dir takes that stage's model; --model tiny shrinks every such model to
toy sizes (same structure).

Ends with one RESULT line per case: value = peak GiB/device, baseline = 48 (A6000 GiB), ratio = value / baseline.
"""

from __future__ import annotations

import os
import sys

if "jax" in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    raise RuntimeError("bench/memory.py must set XLA_FLAGS before jax is imported; run it as a script")
NO_LICM = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # buffer assignment is decided on HLO, before LLVM: skipping LLVM's optimisations halves compile time and left
    # every byte of memory_analysis unchanged (checked on all 16 cases at 7B)
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "--no-licm" in sys.argv:  # read before argparse: XLA flags are fixed when jax initialises its backend
    os.environ["XLA_FLAGS"] += " " + NO_LICM
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

import jax  # noqa: E402
from hf_configs import LLAVA15_7B, tiny_text, tiny_vision  # noqa: E402  (bench/, this script's folder)

GIB = 2**30
BUDGET_GIB = 48.0  # RTX A6000
GLOBAL_BATCH = 8  # STIC: pairs (stage 1) / samples (stage 2) per optimizer step
# the model: llava-hf/llava-1.5-7b-hf's config.json (bench/hf_configs.py, beside this script); the test's model is
# the same structure at toy sizes (every sharded dim divisible by 8; LoRA rank TINY_LORA_RANK)
TINY = {**LLAVA15_7B, "image_token_index": 255, "text_config": tiny_text(LLAVA15_7B["text_config"]),
        "vision_config": tiny_vision(LLAVA15_7B["vision_config"])}
TINY_LORA_RANK = 8
MESHES = {"fsdp1": (1, 1, 1), "fsdp4": (1, 4, 1), "fsdp8": (1, 8, 1), "fsdp4_tp2": (1, 4, 2)}
CASES = ("dpo_lora", "dpo_lora_bf16", "dpo_lora_frozen_bf16", "sft_lora", "sft_full")
DEFAULT_MESHES = ("fsdp1", "fsdp4", "fsdp8", "fsdp4_tp2")
CONFIG_MESHES = ("fsdp8",)  # --config: the configs' batch is per 8-GPU host


CAVEATS = """caveats: XLA:CPU's buffer assignment stands in for XLA:GPU's. Arguments/outputs/aliases are exact (the analytic
shard sizes to the byte, less the tower's unused post-layernorm, which jit prunes); temps are a proxy: XLA:CPU
upcasts bf16 work to f32 and keeps f32 copies (with bf16 params, loop-invariant code motion hoists f32 copies of
whole stacked weights out of the layer loop: see --no-licm), GPU fuses and schedules differently, and the LLM's
attention here is xla_flash where an A6000 runs pallas_gpu (tower: cuDNN). Not counted: CUDA context and
cuBLAS/cuDNN workspaces, fragmentation, the eval step, checkpoint copies. JAX preallocates 75% of GPU memory
unless XLA_PYTHON_CLIENT_MEM_FRACTION is raised."""


def train_config(case: str, mesh_axes: tuple[int, int, int], *, seq_len: int = 2048, lora_rank: int | None = None):
    """The STIC stage config for `case`, with the batch split over the mesh (see the module docstring).
    lora_rank: another adapter rank (alpha scaled with it), for the tiny model whose dims are below 128."""
    from vlmjax.train.config_io import load_config

    c = load_config(f"{REPO / 'configs' / 'stic' / 'llava15_7b.py'}:{'stage1' if case.startswith('dpo') else 'stage2'}")
    if case == "dpo_lora_bf16":
        c.model.param_dtype = "bfloat16"
    if case == "dpo_lora_frozen_bf16":
        c.model.frozen_param_dtype = "bfloat16"
    if lora_rank is not None and c.lora.rank:
        c.lora.update(rank=lora_rank, alpha=c.lora.alpha * lora_rank / c.lora.rank)
    if case == "sft_full":
        c.lora.rank = 0
        c.train.trainable = ("^llm/", "^projector/")
        c.optim.groups = ()
    groups = mesh_axes[0] * mesh_axes[1]  # devices the batch rows are split over
    c.data.batch_size = groups
    c.data.max_images = 2 * groups
    c.data.seq_len = seq_len
    c.train.grad_accum = max(1, GLOBAL_BATCH // groups)
    return c


def model_config(c, arch):
    """`arch` (a VLMConfig, or an HF LLaVA config.json dict) with the execution knobs config `c` runs it with."""
    from vlmjax.convert.hf_config import vlm_config_from_hf
    from vlmjax.train.aot import with_execution
    from vlmjax.train.setup import build_param_dtype

    arch = vlm_config_from_hf(arch) if isinstance(arch, dict) else arch
    return with_execution(arch, dtype=c.model.dtype, param_dtype=build_param_dtype(c.model), remat=c.model.remat)


def make_mesh(mesh_name: str):
    from vlmjax import sharding as shd

    axes = MESHES[mesh_name]
    return shd.make_mesh(*axes, devices=jax.devices()[:axes[0] * axes[1] * axes[2]]), axes[0] * axes[1]


def run_case(case: str, mesh_name: str, hf: dict, seq_len: int, lora_rank: int | None = None) -> dict:
    from vlmjax.train.aot import aot_memory

    mesh, groups = make_mesh(mesh_name)
    c = train_config(case, MESHES[mesh_name], seq_len=seq_len, lora_rank=lora_rank)
    r = aot_memory(c, model_config(c, hf), mesh)
    return {**r, "case": case, "mesh": mesh_name, "rows_per_device": r["rows_per_micro"] // groups}


# ---- --config: a recipe config's own train step


def model_arch(file: str, c, tiny: bool = False, seen: tuple = ()):
    """-> (VLMConfig without execution knobs, source label): the model stage config `c` of `file` trains, from
    bench/hf_configs.py. init=assemble: model.llm + model.vision + a fresh model.projector, through
    `assemble.assembled_config`, with the stage's data.image recorded as build_model records it; hf / checkpoint /
    native: the model of the stage (in the file's STAGES) whose export_dir is model.path, else the LLaVA repo
    that model.path names. tiny: the same architecture at toy sizes (hf_configs.tiny_text / tiny_vision)."""
    import hf_configs as H
    from vlmjax.convert.assemble import assembled_config
    from vlmjax.convert.hf_config import llm_config_from_hf, vision_config_from_hf, vlm_config_from_hf
    from vlmjax.train.config_io import load_config, load_module
    from vlmjax.train.setup import recorded_config

    mc = c.model
    if mc.init == "assemble":
        if not isinstance(mc.vision, str):
            raise ValueError(f"{file}: model.vision is a fresh tower's config; --config takes repos (bench/hf_configs.py)")
        lrepo = H.repo_for(mc.llm, H.LLMS, f"{file}: model.llm")
        vrepo = H.repo_for(mc.vision, H.VISION, f"{file}: model.vision")
        t, v, image_id = H.LLMS[lrepo], H.VISION[vrepo], H.TOKENIZER_LEN[lrepo]
        if tiny:
            t, v, image_id = H.tiny_text(t), H.tiny_vision(v), 256
        cfg = assembled_config(llm_config_from_hf(t), vision_config_from_hf(v), image_id,
                               projector=mc.get("projector", "mlp2x_gelu"),
                               vision_feature_layer=mc.get("vision_feature_layer", -2))
        image = c.data.image.to_dict() if hasattr(c.data.image, "to_dict") else dict(c.data.image or {})
        via = f" (built by :{seen[-1]})" if seen else ""
        return recorded_config(cfg, image), f"{lrepo} + {vrepo} + {cfg.projector}{via}"
    if mc.init not in ("hf", "checkpoint", "native"):
        raise ValueError(f"{file}: model.init={mc.init!r}; --config builds assemble / hf / checkpoint / native models")
    for stage in getattr(load_module(file), "STAGES", ()):
        prev = load_config(f"{file}:{stage}")
        if prev.get("export_dir") == mc.path and stage not in seen:
            return model_arch(file, prev, tiny, seen + (stage,))
    repo = H.repo_for(mc.path, H.LLAVA, f"{file}: model.path")
    d = H.LLAVA[repo]
    if tiny:
        d = {**d, "image_token_index": 255, "text_config": H.tiny_text(d["text_config"]),
             "vision_config": H.tiny_vision(d["vision_config"])}
    return vlm_config_from_hf(d), repo + (f" (built by :{seen[-1]})" if seen else "")


def config_label(spec: str) -> str:
    file, _, stage = spec.partition(":")
    p = Path(file).resolve()
    name = str(p.relative_to(REPO / "configs")) if p.is_relative_to(REPO / "configs") else p.name
    return name.removesuffix(".py") + (f":{stage}" if stage else "")


def run_config(spec: str, mesh_name: str, overrides=(), seq_len: int | None = None, tiny: bool = False) -> dict:
    """The train step config `spec` (FILE:STAGE, loaded by config_io with `overrides`) runs, on `mesh_name`:
    its batch_size rows per micro-batch over the mesh's batch devices, its grad_accum, seq_len, max_images."""
    from vlmjax.train.aot import aot_memory
    from vlmjax.train.config_io import load_config

    c = load_config(spec, overrides)
    if seq_len:
        c.data.seq_len = seq_len
    if tiny and c.lora.rank:
        c.lora.update(rank=TINY_LORA_RANK, alpha=c.lora.alpha * TINY_LORA_RANK / c.lora.rank)
    mesh, groups = make_mesh(mesh_name)
    if c.data.batch_size % groups:
        raise ValueError(f"{spec}: data.batch_size={c.data.batch_size} rows do not split over the {groups} batch "
                         f"devices of {mesh_name}")
    arch, source = model_arch(spec.partition(":")[0], c, tiny=tiny)
    vcfg = model_config(c, arch)
    r = aot_memory(c, vcfg, mesh)
    label = config_label(spec) + (f"[{' '.join(overrides)}]" if overrides else "")
    return {**r, "case": label, "config": spec, "overrides": list(overrides), "mesh": mesh_name, "model": source,
            "rows_per_device": r["rows_per_micro"] // groups, "seq_len": int(c.data.seq_len),
            "max_images": int(c.data.max_images), "tokens_per_image": int(vcfg.tokens_per_image),
            "vocab_size": int(vcfg.llm.vocab_size), "lora_rank": int(c.lora.rank),
            "trainable": list(c.train.trainable), "attention": attention_impls(vcfg, int(c.data.seq_len))}


def attention_impls(vcfg, seq_len: int) -> str:
    """What attention_impl='auto' compiles to here (CPU) for the LLM and the tower's shapes."""
    import jax.numpy as jnp

    from vlmjax.ops.attention import select_impl

    t, v = vcfg.llm, vcfg.vision
    n = (v.image_size // v.patch_size) ** 2 + int(v.has_cls)
    q = jax.ShapeDtypeStruct((2, seq_len, t.num_heads, t.dim_per_head), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, seq_len, t.num_kv_heads, t.dim_per_head), jnp.bfloat16)
    qv = jax.ShapeDtypeStruct((2, n, v.num_heads, v.hidden_size // v.num_heads), jnp.bfloat16)
    return (f"LLM (S={seq_len}, segment ids): {select_impl(q, kv, segment_ids=True)}; "
            f"tower (S={n}): {select_impl(qv, qv)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("7b", "tiny"), default="7b", help="tiny: every model at toy sizes")
    ap.add_argument("--cases", nargs="*", choices=CASES, help="default: all (none with --config); runs = cases x meshes")
    ap.add_argument("--meshes", nargs="*", choices=tuple(MESHES),
                    help=f"default: {DEFAULT_MESHES} for cases, {CONFIG_MESHES} for --config")
    ap.add_argument("--runs", nargs="*", metavar="CASE@MESH", help="explicit runs instead of cases x meshes")
    ap.add_argument("--config", action="append", default=[], metavar="FILE:STAGE",
                    help="a recipe training config's own step (repeatable; x --meshes)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every --config")
    ap.add_argument("--seq", type=int, default=None,
                    help="seq_len (cases: default 2048, 64 for --model tiny; --config: default the config's)")
    ap.add_argument("--no-licm", action="store_true", help=f"add {NO_LICM}: XLA:CPU upcasts bf16 weights to f32 "
                    "and hoists those copies of whole stacked params out of the layer loop (a CPU-only artifact)")
    ap.add_argument("--json", action="store_true", help="also print each case's full dict as a CASE {json} line")
    a = ap.parse_args()
    from vlmjax.convert.hf_config import vlm_config_from_hf

    hf = LLAVA15_7B if a.model == "7b" else TINY
    seq = a.seq or (2048 if a.model == "7b" else 64)
    runs = []
    if a.cases or a.runs or not a.config:
        runs = [(c, m) for c in (a.cases or CASES) for m in (a.meshes or DEFAULT_MESHES)]
    if a.runs:
        runs = [tuple(r.split("@")) for r in a.runs]
        bad = [r for r in runs if len(r) != 2 or r[0] not in CASES or r[1] not in MESHES]
        if bad:
            ap.error(f"--runs {bad}: use CASE@MESH with CASE in {CASES}, MESH in {tuple(MESHES)}")
    runs += [(spec, m, "config") for spec in a.config for m in (a.meshes or CONFIG_MESHES)]
    print(f"{jax.device_count()} {jax.default_backend()} devices (forced); model {a.model}"
          f"{'; LICM off' if a.no_licm else ''}", flush=True)
    if any(len(r) == 2 for r in runs):
        print(f"STIC cases: seq {seq}; attention_impl auto -> {attention_impls(vlm_config_from_hf(hf), seq)}", flush=True)
    results = []
    for run in runs:
        t0 = time.perf_counter()
        if len(run) == 2:
            r = run_case(run[0], run[1], hf, seq, lora_rank=None if a.model == "7b" else TINY_LORA_RANK)
        else:
            r = run_config(run[0], run[1], a.set, seq_len=a.seq, tiny=a.model == "tiny")
            print(f"  {r['case']}: {r['model']}; seq {r['seq_len']}, max_images {r['max_images']} x "
                  f"{r['tokens_per_image']} tokens, vocab {r['vocab_size']}, lora rank {r['lora_rank']}, trainable "
                  f"{r['trainable']}; attention_impl auto -> {r['attention']}", flush=True)
        results.append(r)
        print(f"  {r['case']:14s} {r['mesh']:10s} compiled in {r['compile_s']:.0f} s (lower {r['lower_s']:.0f} s, "
              f"total {time.perf_counter() - t0:.0f} s); peak {r['peak'] / GIB:.2f} GiB/device", flush=True)
        if a.json:
            print("CASE " + json.dumps(r), flush=True)
    w = max([14] + [len(r["case"]) for r in results])
    hdr = (f"{'case':{w}s} {'mesh':10s} {'trainable':>10s} {'rows/dev x k':>12s} {'args':>7s} {'(params':>8s} {'opt':>6s} "
           f"{'batch)':>7s} {'output':>7s} {'temp':>7s} {'alias':>7s} {'peak':>7s}  fits 48G  fits 36G  compile")
    print("\nper-device GiB (params = trainable + frozen shards; opt = AdamW moments; 36G = JAX's default 75% "
          "preallocation of 48G)")
    print(hdr)
    g = lambda b: b / GIB  # noqa: E731
    for r in results:
        print(f"{r['case']:{w}s} {r['mesh']:10s} {r['trainable_params'] / 1e6:9.0f}M {r['rows_per_device']:>8d} x {r['grad_accum']:<2d}"
              f"{g(r['argument']):7.2f} {g(r['trainable_bytes'] + r['frozen_bytes']):8.2f} {g(r['opt_bytes']):6.2f} "
              f"{g(r['batch_bytes']):7.3f} {g(r['output']):7.2f} {g(r['temp']):7.2f} {g(r['alias']):7.2f} "
              f"{g(r['peak']):7.2f}  {'yes' if g(r['peak']) <= BUDGET_GIB else 'NO':8s}  "
              f"{'yes' if g(r['peak']) <= 0.75 * BUDGET_GIB else 'NO':8s}  {r['compile_s']:5.0f} s")
    print(CAVEATS)
    for r in results:
        v = round(g(r["peak"]), 3)
        print("RESULT " + json.dumps(dict(case=f"{r['case']}@{r['mesh']}", value=v, baseline=BUDGET_GIB,
                                          ratio=round(v / BUDGET_GIB, 4))))


if __name__ == "__main__":
    main()
