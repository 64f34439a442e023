"""STIC reproduced in miniature on offline easy-vqa: the `make demo` pipeline, composed from library pieces.

    python -m vlmjax.recipes.stic.miniature [--workdir runs/stic_mini] [--seeds 0 1 2] [--quick] [--llm smollm2]
    python -m vlmjax.recipes.stic.miniature --single [--negatives plain] [--stic-seed N]   # one run, its own table

1. base model: the recipes' shared mini base (`vlmjax.recipes.mini_base`: pretrained conv-stem tower, caption
   alignment, SFT on QA conversations with a description turn asked with STIC's simple / detailed / DaR prompts and
   an "imagine" turn, all on easy-vqa train images 3000-3999), built once per seed and cached; its gate is printed.
   Evaluated on the easy-vqa test split, directly and with DaR.
2. STIC stage 1: `make_preferences` on unlabeled train images 0-479 (pixels only) with the base model, corrupted
   negatives `--corruptions` (default lowres:4 blur:8: the paper's 20 px downscale and colour jitter leave a
   64 px shape intact), DPO (:stage1, LoRA + projector, reference = adapter off). Stage 2: `make_infused_sft` with
   the stage-1 model on a subset of the base SFT data, SFT continuing the adapter (:stage2). Evaluated again.
3. The pairs are judged against the unlabeled images' true attributes (never used in training): how often the
   rejected side is really wrong. A model HF can express is exported and reloaded with transformers (logits
   compared); the shared base's conv stem makes a native folder.
Every step is skipped when its output exists, so a rerun resumes. By default STIC runs for seeds 0 1 2 on the one
base, each also with the no-negatives ablation (`negatives="plain"`: rejected = a plain description of the clean
image); the report (`run_seeds`) prints the gate, a mean +- sd table, the real-negative fractions and the figure paths
(WORKDIR/figures/*.png), and writes WORKDIR/results/miniature.json (config, seeds, commit, host, wall-clock).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np

from vlmjax.eval.easy_vqa import answer_kind, description_accuracy, description_task, evaluate_by_kind  # noqa: F401
from vlmjax.generate.jsonl import read_jsonl
from vlmjax.recipes import mini_base
from vlmjax.recipes.mini_base import DESCRIBE_PROMPTS, base_gate, sft_turns
from vlmjax.recipes.stic import prompts as P
from vlmjax.train import stages

REPO = Path(__file__).resolve().parents[3]


CONFIGS = {"scratch": REPO / "configs" / "stic" / "mini.py", "smollm2": REPO / "configs" / "stic" / "mini_smollm2.py"}


def stage_config(stage: str, config_file: Path = CONFIGS["scratch"]):
    return stages.stage_config(config_file, stage)


# ----------------------------------------------------------------------------------------------------- data


def prepare_data(root: Path, *, n_base: int, seed: int = 0) -> dict:
    """--llm smollm2's own base: easy-vqa train split -> base captions / SFT conversations on the LAST n_base train
    images (the unlabeled images are the first ones, as for the shared base) + the corpus tokenizer."""
    from vlmjax.data import easy_vqa
    from vlmjax.data.tokenizer import train_tokenizer

    data = root / "data"
    done = data / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    easy_vqa.build(str(data), splits=("train",))
    records = json.loads((data / "train.json").read_text())
    captions = read_jsonl(data / "train_captions.jsonl")
    if n_base > len(records) - 480:
        raise ValueError(f"n_base = {n_base} > {len(records) - 480} (easy-vqa train images left after the 480 unlabeled)")
    base = records[len(records) - n_base:]
    for rec in base:
        rec["conversations"] = sft_turns(rec["conversations"], np.random.default_rng(zlib.crc32(f"{seed}:{rec['id']}".encode())))
    (data / "base_sft.json").write_text(json.dumps(base))
    with open(data / "base_captions.jsonl", "w") as f:
        f.writelines(json.dumps(captions[r["id"]]) + "\n" for r in base if r["id"] in captions)
    texts = [t["value"].replace("<image>", "") for r in base for t in r["conversations"]]
    texts += list(DESCRIBE_PROMPTS + P.HALLUCINATION) + ["Image description:", "user", "assistant", "system"]
    train_tokenizer(sorted(texts), root / "tokenizer", vocab_size=1024)  # sorted: BPE ties depend on text order
    info = {"base": len(base), "captions": sum(r["id"] in captions for r in base)}
    done.write_text(json.dumps(info))
    return info


# ----------------------------------------------------------------------------------------------------- training


def train_stage(stage: str, workdir: Path, *, config_file: Path = CONFIGS["scratch"], **kw):
    """`vlmjax.train.stages.train_stage` on one of the miniature's stage configs."""
    return stages.train_stage(stage, workdir, config_file=config_file, **kw)


# ----------------------------------------------------------------------------------------------------- evaluation


def evaluate(model_dir: Path, out: Path, *, n: int, dar: bool) -> dict:
    """easy-vqa test accuracy (overall and by answer kind), directly (plus describing n/3 test images) or with
    describe-and-respond."""
    from vlmjax.eval.dar import dar_task

    transform = (lambda model, tok, task: dar_task(model, tok, task, max_new_tokens=24)) if dar else None
    return evaluate_by_kind(model_dir, out, n=n, transform=transform, describe=not dar)


def pair_report(pairs_path: Path, captions_path: Path) -> dict:
    """How often each kind of rejected side is really wrong, judged against the true attributes of the unlabeled
    images (known here, never used for training): {kind and "all": {n, identical, real_negative (the rejected side
    wrong on an attribute the chosen side gets right), chosen/rejected colour and shape right}} as fractions."""
    from vlmjax.eval.easy_vqa import named_attributes

    truth = read_jsonl(captions_path)
    out: dict[str, dict] = {}
    for r in read_jsonl(pairs_path, key=None):
        t = truth.get(r["id"])
        if t is None or not (t.get("color") and t.get("shape")):
            continue
        kind = r["rejected_kind"] + (f"/{r['corruption']}" if r.get("corruption") else "")
        named = {side: named_attributes(r[side]) for side in ("chosen", "rejected")}
        right = {(side, attr): named[side][attr] == t[attr] for side in named for attr in ("color", "shape")}
        # a real negative: the rejected side is wrong on an attribute the chosen side gets right
        real = any(right["chosen", a] and not right["rejected", a] for a in ("color", "shape"))
        for name in (kind, "all"):
            k = out.setdefault(name, {"n": 0, "identical": 0, "real_negative": 0, "chosen_color": 0,
                                      "rejected_color": 0, "chosen_shape": 0, "rejected_shape": 0})
            k["n"] += 1
            k["identical"] += r["chosen"] == r["rejected"]
            k["real_negative"] += real
            for (side, attr), ok in right.items():
                k[f"{side}_{attr}"] += ok
    return {kind: {"n": k["n"], **{x: round(v / k["n"], 3) for x, v in k.items() if x != "n"}} for kind, k in out.items()}


def hf_reload_check(model_dir: Path, image) -> float:
    """Max |logit| difference between vlmjax and transformers on one image + prompt of the exported folder."""
    import torch
    import transformers

    from vlmjax.generate.loading import load_model
    from vlmjax.generate.requests import Encoder, Request

    model, cfg, tok = load_model(model_dir)
    enc = Encoder(tok, cfg).prompt(Request("check", [{"role": "user", "content": "<image>\nWhat shape is this?"}], [image]))
    ours = np.asarray(model(np.array([enc.ids], np.int32), enc.pixels, np.zeros(1, np.int32)))
    ref = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor([enc.ids]), pixel_values=torch.tensor(enc.pixels.transpose(0, 3, 1, 2))).logits.numpy()
    return float(np.abs(theirs - ours).max())


# ----------------------------------------------------------------------------------------------------- pipeline


MINI_CORRUPTIONS = ("lowres:4", "blur:8")  # the paper's lowres (20 px) and colour jitter keep a 64 px shape (README)


def own_base(root: Path, *, seed: int, quick: bool, llm: str) -> dict:
    """--llm smollm2: the base trained here from configs/stic/mini_smollm2.py:align, :sft on images 1000-3999."""
    scale, n_base = (0.02, 64) if quick else (1.0, 3000)
    print(f"data: {prepare_data(root, n_base=n_base, seed=seed)}", flush=True)
    data, images = root / "data", str(root / "data" / "images")
    over = {"train.seed": seed, "model.seed": seed, **({"data.batch_size": 2} if quick else {})}
    align = train_stage("align", root / "align", config_file=CONFIGS[llm], image_root=images, steps_scale=scale,
                        source=str(data / "base_captions.jsonl"), over=over)
    sft = train_stage("sft", root / "sft", config_file=CONFIGS[llm], model_path=str(align), image_root=images,
                      source=str(data / "base_sft.json"), steps_scale=scale, over=over)
    return {"model": str(sft), "images": images, "data": str(data), "root": str(root)}


def run(root: Path, *, negatives: str = "generated", quick: bool = False, n_eval: int = 300, seed: int = 0,
        stic_seed: int = 0, llm: str = "scratch", base_cache: Path | None = None, base: dict | None = None,
        corruptions: tuple[str, ...] = MINI_CORRUPTIONS) -> dict:
    """seed: the base (the shared mini base's seed); stic_seed: pair plans, sampling and STIC training (a nonzero
    stic_seed gets its own folder, so several STIC runs share one base). llm: "scratch" (the shared mini base,
    cached in `base_cache`, default ROOT/../mini_base) or "smollm2" (configs/stic/mini_smollm2.py, trained here).
    base: a mini base built already (`mini_base.build_base`'s dict, e.g. the test suite's shared tiny one), used as is.
    Unlabeled images: easy-vqa train images 0-479 (the recipes' pool; the shared base never saw them)."""
    from vlmjax.convert.native import folder_kind, hf_unsupported_reason, read_native_config
    from vlmjax.generate.loading import load_model
    from vlmjax.recipes.mini_base import RECIPE_POOL
    from vlmjax.recipes.stic.make_infused_sft import make_infused_sft
    from vlmjax.recipes.stic.make_preferences import PromptSet, make_preferences

    quick_over = {"data.batch_size": 2} if quick and llm != "scratch" else {}

    def train_stage_(stage, workdir, *, over=None, **kw):
        return train_stage(stage, workdir, config_file=CONFIGS[llm], over={**(over or {}), **quick_over}, **kw)

    scale = 0.02 if quick else 1.0  # quick: 2-6 steps per stage, a smoke run of every step of the pipeline
    n_unlabeled, n_subset = (12, 12) if quick else (480, 480)
    n_eval = 16 if quick else n_eval
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    print("[1/6] base model", flush=True)
    if base is not None:
        base_info = base
    elif llm == "scratch":
        base_info = mini_base.shared_base(Path(base_cache or root.parent / "mini_base"), seed=seed, quick=quick)
    else:
        base_info = own_base(root, seed=seed, quick=quick, llm=llm)
    base, images, data = Path(base_info["model"]), base_info["images"], Path(base_info["data"])
    results = {"base_model": str(base), "base_images": images,
               "base": evaluate(base, root / "results" / f"base_seed{seed}.json", n=n_eval, dar=False),
               "base_dar": evaluate(base, root / "results" / f"base_seed{seed}_dar.json", n=n_eval, dar=True)}
    print(f"[2/6] base on easy-vqa test: {results['base']} | DaR {results['base_dar']}", flush=True)
    passed, gate_lines = base_gate(results["base"])
    results["base_gate"] = {"passed": passed, "lines": gate_lines}
    print("\n".join(gate_lines), flush=True)

    stic = stic_dir(root, negatives, stic_seed)
    stic.mkdir(exist_ok=True)
    # quick: a few steps leave the model ending every reply at once; min_new_tokens keeps its pairs non-empty
    gen = dict(max_new_tokens=24, batch_size=32, progress=False, min_new_tokens=4 if quick else 0)
    if not (stic / "pairs.jsonl").exists():
        model, _cfg, tok = load_model(base)
        first = RECIPE_POOL[0]
        unlabeled = [(f"train_{n}", f"train/{n}.png") for n in range(first, first + n_unlabeled)]
        stats = make_preferences(model, tok, unlabeled, images, stic / "pairs.jsonl", negatives=negatives,
                                 seed=stic_seed, temperature=0.2, prompts=PromptSet(corruptions=tuple(corruptions)),
                                 **gen)
        (stic / "pairs_stats.json").write_text(json.dumps(stats))
    pair_stats = json.loads((stic / "pairs_stats.json").read_text())
    print(f"[3/6] STIC stage 1 ({negatives} negatives): {pair_stats}", flush=True)
    s1 = train_stage_("stage1", stic / "stage1", model_path=str(base), image_root=images, source=str(stic / "pairs.jsonl"),
                     steps_scale=scale, over={"data.seq_len": 96, "train.seed": stic_seed})
    results["stage1"] = evaluate(s1, stic / "results" / "stage1.json", n=n_eval, dar=False)

    if not (stic / "infused.json").exists():
        model, _cfg, tok = load_model(s1)
        subset = json.loads((data / "base_sft.json").read_text())[:n_subset]
        # quick: a model of a few steps describes greedily in whitespace (all dropped as empty); it samples instead
        (stic / "infused_stats.json").write_text(json.dumps(
            make_infused_sft(model, tok, subset, images, stic / "infused.json", seed=stic_seed,
                             temperature=1.0 if quick else 0.0, **gen)))
    print(f"[4/6] STIC stage 2: {json.loads((stic / 'infused_stats.json').read_text())}", flush=True)
    s2 = train_stage_("stage2", stic / "stage2", model_path=str(base), image_root=images, source=str(stic / "infused.json"),
                     load_params=str(stic / "stage1" / "trainable.safetensors"), steps_scale=scale,
                     over={"train.seed": stic_seed})
    results["stic"] = evaluate(s2, stic / "results" / "stic.json", n=n_eval, dar=False)
    results["stic_dar"] = evaluate(s2, stic / "results" / "stic_dar.json", n=n_eval, dar=True)

    # the export is an HF folder exactly when HF can express the model (train.export_format="auto")
    why = None if folder_kind(s2) == "hf" else hf_unsupported_reason(read_native_config(s2)[0])
    if why is None:
        err = hf_reload_check(s2, str(Path(images) / "train" / "0.png"))
        results["hf_reload_max_abs_logit_diff"] = err
        print(f"[5/6] final model exported to {s2}; transformers reloads it: max |logit diff| = {err:.2e}", flush=True)
    else:
        results["hf_reload_max_abs_logit_diff"] = None
        print(f"[5/6] final model exported to {s2} (a native folder: {why})", flush=True)
    results["seconds"] = round(time.time() - t_start, 1)
    results["pairs"] = pair_stats
    results["pairs_by_kind"] = pair_report(stic / "pairs.jsonl", data / "train_captions.jsonl")
    (stic / "results" / "summary.json").write_text(json.dumps(results, indent=1))
    print("[6/6] pairs judged against the images' true attributes: " + json.dumps(results["pairs_by_kind"]))
    print("\n".join(gate_lines))  # the gate first: a base that does not see makes the table below unreadable
    print(format_table(results, negatives))
    return results


ROWS = (("base", "base", None), ("base + DaR", "base_dar", None), ("STIC stage 1", "stage1", "generated"),
        ("STIC (stage 1 + 2)", "stic", "generated"), ("STIC + DaR", "stic_dar", "generated"),
        ("no negatives (stage 1 + 2)", "stic", "plain"))
METRICS = ("accuracy", "shape", "color", "yes/no", "describe_both")


def stic_dir(root: Path, negatives: str, stic_seed: int) -> Path:
    return root / (f"stic_{negatives}" + (f"_seed{stic_seed}" if stic_seed else ""))


def run_seeds(root: Path, *, seeds=(0, 1, 2), ablation: bool = True, figures: bool = True, **kw) -> dict:
    """`run` for every STIC seed on one base (and the no-negatives ablation), then the report: mean +- sd per row
    (`vlmjax.eval.report`; '*' = exceeds the spread against the no-negatives row), real-negative fractions, PNG
    figures (results bars, stage loss curves, chosen vs rejected descriptions) and WORKDIR/results/miniature.json."""
    from vlmjax.eval import report

    started = time.time()
    negs = ("generated", "plain") if ablation else ("generated",)
    runs = {(neg, s): run(root, negatives=neg, stic_seed=s, **kw) for neg in negs for s in seeds}
    first = runs[negs[0], seeds[0]]
    per_seed = {}
    for label, key, neg in ROWS:
        if neg is None:  # one base model: its evaluation does not vary with the STIC seed
            per_seed[label] = [{m: first[key][m] for m in METRICS if m in first[key]}]
        elif neg in negs:
            per_seed[label] = [{m: runs[neg, s][key][m] for m in METRICS if m in runs[neg, s][key]} for s in seeds]
    agg = report.aggregate(per_seed)
    baseline = "no negatives (stage 1 + 2)" if ablation else None
    table = report.markdown_table(agg, METRICS, baseline=baseline)
    negatives_real = {neg: report.mean_sd([runs[neg, s]["pairs_by_kind"].get("all", {}).get("real_negative", 0.0)
                                           for s in seeds]) for neg in negs}
    out = {"rows": {k: {m: st._asdict() for m, st in v.items()} for k, v in agg.items()}, "per_seed": per_seed,
           "real_negative_fraction": {k: v._asdict() for k, v in negatives_real.items()},
           "pairs_by_kind": {f"{neg}_seed{s}": r["pairs_by_kind"] for (neg, s), r in runs.items()},
           "gate": first["base_gate"], "table": table, "seeds": list(seeds), "base_seed": kw.get("seed", 0),
           "config": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                      for k, v in kw.items()}}
    if figures:
        out["figures"] = draw_figures(root, agg, runs, negs, seeds)
    report.write_results(root / "results" / "miniature.json", out, meta=report.run_meta(started))
    print("\n".join(first["base_gate"]["lines"]))
    print(table)
    print("real negatives (rejected wrong where chosen is right, vs the true attributes): "
          + ", ".join(f"{neg} {report.format_stat(st)}" for neg, st in negatives_real.items()))
    for path in out.get("figures", {}).values():
        print(f"figure: {path}")
    return out


def draw_figures(root: Path, agg: dict, runs: dict, negs, seeds) -> dict:
    from vlmjax.eval import plots

    fig = root / "figures"
    seed0 = seeds[0]
    stic = stic_dir(root, negs[0], seed0)
    curves = {f"{stage} (seed {seed0})": stic / stage / "metrics.jsonl" for stage in ("stage1", "stage2")}
    pairs = [json.loads(line) for line in (stic / "pairs.jsonl").read_text().splitlines()][:8]
    images = Path(runs[negs[0], seed0]["base_images"])
    items = [(str(images / p["image"]), [f"chosen: {p['chosen']}",
                                         f"rejected ({p['rejected_kind']}{'/' + p['corruption'] if p.get('corruption') else ''}): "
                                         f"{p['rejected']}"]) for p in pairs]
    return {"results": plots.bar_chart(agg, METRICS, fig / "results.png", title="STIC miniature (easy-vqa test)"),
            "losses": plots.loss_curves({k: v for k, v in curves.items() if v.exists()}, fig / "losses.png",
                                        title="STIC stage losses"),
            "pairs": plots.image_grid(items, fig / "pairs.png", title="STIC pairs: chosen vs rejected")}


def format_table(r: dict, negatives: str) -> str:
    rows = [("base", "base"), ("base + DaR", "base_dar"), ("STIC stage 1", "stage1"), ("STIC (stage 1 + 2)", "stic"),
            ("STIC + DaR", "stic_dar")]
    kinds = [k for k in ("shape", "color", "yes/no", "describe_both") if k in r["base"]]
    head = f"| model ({negatives} negatives) | accuracy | " + " | ".join(kinds) + " |"
    lines = [head, "|" + "---|" * (2 + len(kinds))]
    for name, key in rows:
        m = r[key]
        lines.append(f"| {name} | {m['accuracy']:.3f} | " + " | ".join(f"{m[k]:.3f}" if k in m else "-" for k in kinds) + " |")
    lines.append(f"(easy-vqa test, n={r['base']['n']} questions; {r['seconds']:.0f} s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/stic_mini"))
    ap.add_argument("--negatives", default="generated", choices=["generated", "plain"],
                    help="plain = the no-negatives ablation (rejected = a plain description of the clean image)")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything (CI smoke run)")
    ap.add_argument("--llm", default="scratch", choices=sorted(CONFIGS),
                    help="smollm2: the same pipeline on the pretrained SmolLM2-135M (configs/stic/mini_smollm2.py)")
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="the base's seed (the shared mini base's, or --llm smollm2's)")
    ap.add_argument("--base-cache", type=Path, default=None,
                    help="the shared mini base's cache folder (default: WORKDIR/../mini_base)")
    ap.add_argument("--corruptions", nargs="+", default=list(MINI_CORRUPTIONS),
                    help="corrupted-image negatives (default lowres:4 blur:8: the paper's 20 px downscale and colour "
                         "jitter leave a 64 px shape intact; `lowres color_jitter` = the paper's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="STIC seeds (pair plans, sampling, STIC training) on the one base; the table gives mean +- sd")
    ap.add_argument("--no-ablation", action="store_true", help="skip the no-negatives ablation (half the runs)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--single", action="store_true",
                    help="one STIC run (--negatives, --stic-seed) and its one-run table instead of the seeded report")
    ap.add_argument("--stic-seed", type=int, default=0, help="--single: the STIC seed (own folder if nonzero)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    kw = dict(quick=args.quick, n_eval=args.n_eval, seed=args.seed, llm=args.llm, base_cache=args.base_cache,
              corruptions=tuple(args.corruptions))
    if args.single:
        r = run(args.workdir, negatives=args.negatives, stic_seed=args.stic_seed, **kw)
        err = r["hf_reload_max_abs_logit_diff"]
        return 0 if err is None or err < 1e-3 else 1
    run_seeds(args.workdir, seeds=tuple(args.seeds), ablation=not args.no_ablation, figures=not args.no_figures, **kw)
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
