"""POINTS reproduced in miniature on offline easy-vqa (issue 18), composed from library pieces.

    python -m vlmjax.recipes.points.miniature --part filter [--workdir runs/points_mini/filter]
        [--base-cache runs/mini_base] [--seeds 0 1 2] [--presentations 8000] [--high] [--sft] [--quick]
    python -m vlmjax.recipes.points.miniature --part soup [--workdir runs/points_mini/soup] [--seeds 0]
        [--soup-steps 150] [--ingredient-steps 80] [--ingredient-lr 1e-3] [--val-n 200]
        [--filter-workdir runs/points_mini/filter] [--quick]   (`points.soup_mini`)

--part filter: perplexity filtering of pre-training captions.
1. Pool (`points.pool`): easy-vqa train images 0-2999 (never seen by the shared base), 3 captions each: 30% clean,
   30% mismatched (another image's caption), 20% obscure (clean + a serial/version tail), 15% unrelated openclipart
   captions, 5% generic ("An image.").
2. Scorer = the existing VLM: the shared mini base (`mini_base.build_base`, aligned and SFT'd on images 3000-3999).
   `points.filter.score` gives every pair's PPL (caption teacher-forced as the reply to "please generate a caption
   for this image."), `points.filter.select` keeps the lowest 20%. Gates printed first: the base sees (`base_gate`),
   and its PPL separates clean from mismatched captions (AUC).
3. Arms, each a caption pre-training stage with the same number of caption presentations (`--presentations`): all
   pairs; lowest-PPL 20%; random 20%; clean only (the oracle); highest-PPL 20% (--high). Each arm is the base's own
   align stage (configs/mini/base.py:align) on the arm's captions: the base's pretrained tower (frozen), a fresh
   projector and decoder. Not the base's align checkpoint: its decoder already learnt to caption these images from
   clean captions, so an arm could only unlearn, and its scorer (the base) would rank what the student already
   knows. From the tower, the arms differ only in their data, as pre-training runs do.
4. Each pre-trained model captions 300 test images in its own (plain) template: colour / shape / both right vs the
   truth; and its PPL on clean captions of those held-out images. --sft adds a short SFT of each arm on the base's
   SFT conversations and the easy-vqa test accuracy by kind.
Seeds (training order and init; the random arm's draw) give mean +- sd, Welch against "all pairs"
(`vlmjax.eval.report`), PNG figures (`vlmjax.eval.plots`) and WORKDIR/results/filter.json (with run_meta).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vlmjax.recipes.points import pool as PP

ARMS = ("all pairs", "lowest-PPL 20%", "random 20%", "clean only (oracle)", "highest-PPL 20%")
SLUG = {"all pairs": "all", "lowest-PPL 20%": "low20", "random 20%": "random20", "clean only (oracle)": "clean",
        "highest-PPL 20%": "high20"}
METRICS = ("describe_color", "describe_shape", "describe_both", "heldout_ppl")
LABELS = {"describe_color": "colour right", "describe_shape": "shape right", "describe_both": "both right",
          "heldout_ppl": "held-out clean PPL"}
KIND_LABELS = {"mismatched": "mismatch", "openclipart": "clip art"}
FRACTION = 0.2
PRESENTATIONS = 8_000  # a third of the base's own align stage (300 x 16 rows x ~5 captions): ~600 CPU s in all
N_TEST = 300
WARMUP = 15
FROZEN_TOWER = ("^projector/", "^llm/")


# ----------------------------------------------------------------------------------------------------- base


# ----------------------------------------------------------------------------------------------------- scoring


def score_pool(base: dict, pool_path: Path, work: Path, fraction: float = FRACTION) -> tuple[dict, dict]:
    """PPL of every pair under the base (`points.filter.score`, resumable) and the lowest-`fraction` selection
    (`points.filter.select` -> WORK/filter/kept.jsonl + filter_report.json). -> (ppl by id, select's report)."""
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.generate.loading import load_model
    from vlmjax.recipes.points import filter as PF

    spec = SourceSpec(format="caption", path=str(pool_path), image_root=base["images"])
    ppl_path, name = work / "ppl.jsonl", f"mini_base:{Path(base['root']).name}"
    report_path = work / "filter" / "filter_report.json"
    if not report_path.exists():
        model, _cfg, tok = load_model(base["model"])
        PF.score(model, tok, spec, ppl_path, scorer=name, batch_size=64, progress=False)
        PF.select(ppl_path, spec, work / "filter", fraction=fraction, expect={"scorer": name})
    _head, recs = PF.read_ppl([str(ppl_path)])
    bad = [k for k, r in recs.items() if "error" in r]
    if bad:
        raise ValueError(f"{ppl_path}: {len(bad)} pairs could not be scored (first {bad[:3]}); see their records")
    return {k: r["perplexity"] for k, r in recs.items()}, json.loads(report_path.read_text())


def scorer_gate(pool: list[dict], ppl: dict) -> tuple[bool, list[str], dict]:
    """Does the scorer's PPL separate clean from mismatched captions? AUC (and each noise kind against clean)."""
    by = {k: [ppl[r["id"]] for r in pool if r["noise"] == k] for k in PP.KINDS}
    aucs = {k: PP.auc(by[k], by["clean"]) for k in PP.KINDS if k != "clean"}
    med = {k: float(np.median(v)) for k, v in by.items()}
    ok = aucs["mismatched"] >= 0.75
    lines = [f"scorer gate (the base's PPL ranks mismatched above clean captions, AUC >= 0.75): "
             f"AUC {aucs['mismatched']:.3f} {'ok' if ok else 'FAIL - the filter cannot tell them apart'}"]
    lines += [f"  {k:<12} median PPL {med[k]:9.2f}" + (f"   AUC vs clean {aucs[k]:.3f}" if k in aucs else "")
              for k in PP.KINDS]
    return ok, lines, {"auc_vs_clean": aucs, "median_ppl": med}


def arm_records(arm: str, pool: list[dict], ppl: dict, seed: int, fraction: float = FRACTION) -> list[dict]:
    k = int(np.floor(fraction * len(pool)))
    ranked = sorted(pool, key=lambda r: (ppl[r["id"]], r["id"]))  # as points.filter.select_ppl ranks
    if arm == "all pairs":
        return pool
    if arm == "lowest-PPL 20%":
        return ranked[:k]
    if arm == "highest-PPL 20%":
        return ranked[len(ranked) - k:]
    if arm == "random 20%":
        return [pool[i] for i in sorted(np.random.default_rng(1000 + seed).choice(len(pool), k, replace=False))]
    if arm == "clean only (oracle)":
        return [r for r in pool if r["noise"] == "clean"]
    raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")


# ----------------------------------------------------------------------------------------------------- arms


def pretrain(arm_dir: Path, records: list[dict], base: dict, *, seed: int, n: int, quick: bool,
             over: dict | None = None) -> tuple[Path, dict]:
    """The arm's caption pre-training: configs/mini/base.py:align from the base's pretrained tower (frozen) on exactly
    n caption presentations (one pass over `presentations`), ended by the data; -> (export, stage info)."""
    from vlmjax.recipes import mini_base
    from vlmjax.train.stages import stage_config, train_stage

    train = arm_dir / "train.jsonl"
    if not train.exists():
        arm_dir.mkdir(parents=True, exist_ok=True)
        shown = PP.presentations(records, n, seed)
        train.with_suffix(".tmp").write_text("".join(json.dumps(r) + "\n" for r in shown))
        train.with_suffix(".tmp").replace(train)
    rows = int((over or {}).get("data.batch_size", stage_config(mini_base.CONFIG, "align").data.batch_size))
    cap = -(-n // rows) + 10  # an upper bound on the steps (>= 1 caption per row); the end of the data ends the stage
    over = {"train.seed": seed, "model.seed": seed, "data.num_epochs": 1, "train.steps": cap,
            "optim.warmup_steps": 2 if quick else WARMUP, "train.trainable": FROZEN_TOWER, **(over or {})}
    export = train_stage("align", arm_dir / "pretrain", config_file=mini_base.CONFIG, image_root=base["images"],
                         source=str(train), tokenizer=base["tokenizer"], over=over, quiet=True,
                         load_params=str(Path(base["root"]) / "tower" / "tower.safetensors"))
    lines = (arm_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    stage = json.loads((arm_dir / "pretrain" / "stage.json").read_text())
    info = {"presentations": int(last.get("data/samples", -1)), "steps": len(lines), "records": len(records),
            "cpu_seconds": stage["cpu_seconds"], "seconds": stage["seconds"], "loss_last": stage["loss_last"]}
    if info["presentations"] != n:
        raise RuntimeError(f"{arm_dir}: {info['presentations']} captions presented, {n} planned (step cap {cap} "
                           "reached, or samples skipped: see its metrics.jsonl)")
    return export, info


def heldout_captions(out: Path, n: int = N_TEST) -> Path:
    """n easy-vqa test images with known colour and shape as clean caption records (easy-vqa's 3 templates)."""
    from vlmjax.data.easy_vqa import caption
    from vlmjax.eval.easy_vqa import description_task

    if not out.exists():
        rows = [{"id": s.id, "image": s.image, "caption": caption({"color": s.answers[0], "shape": s.answers[1]}, i),
                 "color": s.answers[0], "shape": s.answers[1]} for i, s in enumerate(description_task(n).samples)]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def eval_pretrained(model_dir: Path, heldout: Path, out: Path) -> dict:
    """A caption model, plain template: greedy captions of the held-out images scored by their first colour and shape
    word (`eval.easy_vqa.description_accuracy`), and the PPL of their clean captions (exp of the mean token NLL over
    all of them, caption + end token). Cached in `out`."""
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.eval.easy_vqa import description_accuracy
    from vlmjax.eval.tasks import EvalSample, Task
    from vlmjax.generate import GenerationConfig, default_eos_ids, generate_dataset, load_model
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.generate.requests import requests_from_source
    from vlmjax.scoring import score_dataset

    if out.exists():
        return json.loads(out.read_text())
    model, _cfg, tok = load_model(model_dir)
    spec = SourceSpec(format="caption", path=str(heldout), image_root=None)
    gen_path, score_path = out.with_suffix(".captions.jsonl"), out.with_suffix(".ppl.jsonl")
    generate_dataset(model, tok, requests_from_source(spec, role="generate"), gen_path,
                     GenerationConfig(max_new_tokens=24, eos_token_ids=default_eos_ids(tok, model.cfg)),
                     batch_size=32, progress=False)
    score_dataset(model, tok, requests_from_source(spec, role="score"), score_path, batch_size=64, progress=False)
    truth = read_jsonl(heldout)
    task = Task("heldout_captions", "caption", [EvalSample(k, "", [t["color"], t["shape"]], t["image"])
                                                for k, t in truth.items()])
    preds = {k: r.get("output", "") for k, r in read_jsonl(gen_path).items()}
    res = {**description_accuracy(preds, task), "heldout_ppl": PP.corpus_ppl(read_jsonl(score_path).values()),
           "n": len(task.samples),
           "examples": [preds[s.id] for s in task.samples[:6]]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(res))
    out.with_suffix(".tmp").replace(out)
    return res


def short_sft(arm_dir: Path, pretrained: Path, base: dict, *, seed: int, steps: int, n_eval: int,
              over: dict | None = None) -> dict:
    """--sft: the arm's model SFT'd on the base's SFT conversations (configs/mini/base.py:sft, `steps` steps), then
    easy-vqa test accuracy by kind (`eval.easy_vqa.evaluate_by_kind`)."""
    from vlmjax.eval.easy_vqa import evaluate_by_kind
    from vlmjax.recipes import mini_base
    from vlmjax.train.stages import train_stage

    sft = train_stage("sft", arm_dir / "sft", config_file=mini_base.CONFIG, model_path=str(pretrained),
                      image_root=base["images"], source=str(Path(base["data"]) / "base_sft.json"), quiet=True,
                      over={"train.seed": seed, "model.seed": seed, "train.steps": steps,
                            **{k: v for k, v in (over or {}).items() if not k.startswith("model.vlm.")}})
    r = evaluate_by_kind(sft, arm_dir / "results" / f"sft_n{n_eval}.json", n=n_eval, describe=False)
    return {f"sft_{k}": r[k] for k in ("accuracy", "shape", "color", "yes/no") if k in r}


# ----------------------------------------------------------------------------------------------------- pipeline


def run_filter(work: Path, *, base_cache: Path | None = None, seeds=(0, 1, 2), presentations: int = PRESENTATIONS,
               high: bool = False, sft: bool = False, sft_steps: int = 100, quick: bool = False, n_test: int = N_TEST,
               figures: bool = True, base_seed: int = 0, arms=None, base: dict | None = None,
               stage_over: dict | None = None, pool_images=None) -> dict:
    """The filter part end to end (module docstring); every step is skipped when its output exists, so a rerun
    resumes. base: a base dict as `mini_base.build_base` returns it (default: the shared base from `base_cache`);
    stage_over: dotted overrides of every arm's stages (a smaller model for tests); arms: a subset of ARMS."""
    from vlmjax.eval import report
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.recipes.mini_base import base_gate, base_results, shared_base

    started = time.time()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    images = pool_images or ((0, 120) if quick else PP.POOL_IMAGES)
    n_test = 16 if quick else n_test
    presentations = min(presentations, 480) if quick else presentations
    print("[1/5] base (the scorer)", flush=True)
    base = base or shared_base(base_cache, seed=base_seed, quick=quick)
    gate_ok, gate_lines = base_gate(base_results(base, work / "results" / f"base_n{n_test}.json", n_test))
    print("\n".join(gate_lines), flush=True)
    print("[2/5] pool", flush=True)
    info = PP.build_pool(Path(base["data"]) / "train_captions.jsonl", work / "pool.jsonl", images=images)
    pool = list(read_jsonl(work / "pool.jsonl", key=None))
    print(f"  {info['pairs']} pairs on {info['images']} images: {info['counts']}", flush=True)
    print("[3/5] scoring every pair with the base", flush=True)
    ppl, sel_report = score_pool(base, work / "pool.jsonl", work)
    scorer_ok, scorer_lines, scorer = scorer_gate(pool, ppl)
    print("\n".join(scorer_lines), flush=True)
    arms = list(arms or [a for a in ARMS if high or a != "highest-PPL 20%"])
    if "all pairs" not in arms:
        raise ValueError(f"arms {arms}: the table compares every arm with 'all pairs', which must be one of them")
    kept = {a: PP.kept_by_noise(pool, [r["id"] for r in arm_records(a, pool, ppl, seeds[0])])
            for a in arms if a != "all pairs"}
    heldout = heldout_captions(work / "heldout_captions.jsonl", n_test)
    print(f"[4/5] arms x seeds {list(seeds)}: {presentations} caption presentations each", flush=True)
    per_seed, stages = {}, {}
    ref = eval_pretrained(Path(base["align"]), heldout, work / "results" / "base_align.json")
    per_seed["base align (clean, images 3000-3999)"] = [{m: ref[m] for m in METRICS}]
    for arm in arms:
        per_seed[arm] = []
    for s in seeds:  # seeds outer: an interrupted run has every arm of its first seeds (a rerun resumes)
        for arm in arms:
            d = work / "arms" / f"{SLUG[arm]}_seed{s}"
            export, stages[f"{SLUG[arm]}_seed{s}"] = pretrain(d, arm_records(arm, pool, ppl, s), base, seed=s,
                                                              n=presentations, quick=quick, over=stage_over)
            r = eval_pretrained(export, heldout, d / "results" / "pretrained.json")
            row = {m: r[m] for m in METRICS}
            if sft:
                row.update(short_sft(d, export, base, seed=s, steps=max(2, sft_steps // (50 if quick else 1)),
                                     n_eval=n_test, over=stage_over))
            per_seed[arm].append(row)
            print(f"  {arm} seed {s}: {row} ({stages[f'{SLUG[arm]}_seed{s}']['steps']} steps)", flush=True)
    print("[5/5] report", flush=True)
    agg = report.aggregate(per_seed)
    metrics = list(METRICS) + ([m for m in per_seed[arms[0]][0] if m.startswith("sft_")] if sft else [])
    table = report.markdown_table(agg, metrics, baseline="all pairs", labels=LABELS)
    pairs = [("lowest-PPL 20%", b) for b in ("all pairs", "random 20%", "clean only (oracle)")]
    welch = {f"{a} vs {b}": {m: _welch(agg[a][m], agg[b][m]) for m in metrics} for a, b in pairs
             if a in agg and b in agg}
    kept_table = kept_markdown(kept)
    out = {"gate": {"passed": gate_ok, "lines": gate_lines}, "scorer_gate": {"passed": scorer_ok, "lines": scorer_lines,
                                                                               **scorer},
           "pool": info, "filter_report": {k: v for k, v in sel_report.items() if k != "histogram"},
           "kept_by_noise": kept, "kept_table": kept_table, "per_seed": per_seed, "stages": stages,
           "rows": {a: {m: st._asdict() for m, st in v.items()} for a, v in agg.items()}, "welch": welch,
           "table": table, "config": {"seeds": list(seeds), "presentations": presentations, "quick": quick,
                                      "high": high, "sft": sft, "n_test": n_test, "base": base["root"],
                                      "base_seed": base_seed, "fraction": FRACTION}}
    if figures:
        out["figures"] = draw_figures(work, agg, kept, arms, seeds)
    report.write_results(work / "results" / "filter.json", out, meta=report.run_meta(started))
    print("\n".join(gate_lines + scorer_lines))
    print("kept by the lowest-PPL 20% (and the other selections), by noise kind:\n" + kept_table)
    print(table)
    for name, w in welch.items():
        print(f"Welch {name}: " + ", ".join(f"{LABELS.get(m, m)} " + ("-" if p is None else f"p={p:.3g}")
                                            for m, p in w.items()))
    for path in out.get("figures", {}).values():
        print(f"figure: {path}")
    return out


def _welch(a, b):
    from vlmjax.eval.report import welch

    return welch(a, b)[2] if a.n > 1 and b.n > 1 else None


def kept_markdown(kept: dict) -> str:
    lines = ["| selection | " + " | ".join(PP.KINDS) + " |", "|---|" + "---|" * len(PP.KINDS)]
    for arm, by in kept.items():
        lines.append(f"| {arm} | " + " | ".join(f"{by[k]['kept']:.2f} ({by[k]['share']:.0%})" for k in PP.KINDS) + " |")
    return "\n".join(lines) + ("\n\nfraction of each kind's pairs kept (its share of the kept set); "
                               "random 20%: seed 0's draw.")


def draw_figures(work: Path, agg: dict, kept: dict, arms, seeds) -> dict:
    from vlmjax.eval import plots
    from vlmjax.eval.report import Stat

    fig = work / "figures"
    kept_agg = {a: {k: Stat(v[k]["kept"], None, 1) for k in PP.KINDS} for a, v in kept.items()}
    curves = {f"{a} (seed {seeds[0]})": work / "arms" / f"{SLUG[a]}_seed{seeds[0]}" / "pretrain" / "metrics.jsonl"
              for a in arms}
    describe = [m for m in METRICS if m != "heldout_ppl"]
    return {"captions": plots.bar_chart(agg, describe, fig / "captions.png", labels=LABELS, baseline="all pairs",
                                        title="POINTS miniature: captions of 300 test images (plain template)"),
            "heldout_ppl": plots.bar_chart(agg, ["heldout_ppl"], fig / "heldout_ppl.png", labels=LABELS,
                                           baseline="all pairs", title="PPL of held-out clean captions"),
            "kept": plots.bar_chart(kept_agg, PP.KINDS, fig / "kept_by_noise.png", labels=KIND_LABELS,
                                    title="fraction of each noise kind's pairs kept (one draw)"),
            "losses": plots.loss_curves({k: v for k, v in curves.items() if v.exists()}, fig / "losses.png",
                                        title="caption pre-training loss per arm")}


def main(argv=None) -> int:
    from vlmjax.recipes.points import soup_mini as SM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", required=True, choices=["filter", "soup"])
    ap.add_argument("--workdir", type=Path, default=None, help="default runs/points_mini/{filter,soup}")
    ap.add_argument("--base-cache", type=Path, default=Path("runs/mini_base"), help="the shared mini base's cache")
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: filter 0 1 2, soup 0")
    ap.add_argument("--presentations", type=int, default=PRESENTATIONS, help="caption presentations per arm")
    ap.add_argument("--high", action="store_true", help="also the highest-PPL 20%% arm")
    ap.add_argument("--sft", action="store_true", help="also a short SFT per arm and its easy-vqa test accuracy")
    ap.add_argument("--sft-steps", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=N_TEST)
    ap.add_argument("--quick", action="store_true", help="a few steps of everything on a tiny pool (CI smoke run)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--soup-steps", type=int, default=SM.STEPS, help="soup: steps of the Base SFT (phase 1)")
    ap.add_argument("--ingredient-steps", type=int, default=SM.INGR_STEPS,
                    help="soup: steps of every fine-tune from the Base SFT (phase 2: ingredients, all, lr runs)")
    ap.add_argument("--ingredient-lr", type=float, default=SM.INGR_LR,
                    help="soup: lr of the ingredients; the lr soup uses half, this and twice")
    ap.add_argument("--val-n", type=int, default=200, help="soup: val questions (train images 3300-3499)")
    ap.add_argument("--filter-workdir", type=Path, default=Path("runs/points_mini/filter"),
                    help="soup: start from this filter run's lowest-PPL 20%% arm when it exists")
    args = ap.parse_args(argv)
    if args.part == "soup":
        SM.run_soup(args.workdir or Path("runs/points_mini/soup"), base_cache=args.base_cache,
                    filter_work=args.filter_workdir, seeds=tuple(args.seeds or [0]), steps=args.soup_steps,
                    ingredient_steps=args.ingredient_steps, ingredient_lr=args.ingredient_lr,
                    n_test=args.n_test, val_n=args.val_n, quick=args.quick, figures=not args.no_figures)
        return 0
    try:
        run_filter(args.workdir or Path("runs/points_mini/filter"), base_cache=args.base_cache,
                   seeds=tuple(args.seeds or [0, 1, 2]),
                   presentations=args.presentations, high=args.high, sft=args.sft, sft_steps=args.sft_steps,
                   quick=args.quick, n_test=args.n_test, figures=not args.no_figures, base_seed=args.base_seed)
    except PP.MissingOpenclipart as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    raise SystemExit(main())
