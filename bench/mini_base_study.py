"""The mini base study (README "A mini base that sees"): which design of the from-scratch tiny VLM learns to see
easy-vqa's shapes and colours within the CPU budget of a miniature's base.

    python bench/mini_base_study.py --arms base,no_tower --n 600 [--cache runs/mini_base_study] [--out bench/results/...]

Each arm is configs/mini/base.py plus overrides (tower pretraining steps, patch stem, what trains in SFT, steps); all arms share seed 0's data and tokenizer
(one folder per augment setting) and are scored on the same easy-vqa test questions (n spread over the split, and
n/3 described test images). An arm already done is read back, so the study resumes. Results: one JSON with every
arm's overrides, step counts, wall and CPU seconds (`time.process_time`, all threads: on a machine shared with other
jobs wall-clock is inflated, CPU time much less so) and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

V = "model.vlm.vision."
FROZEN_TOWER = ("^projector/", "^llm/")

# name -> (augment, {"tower": {"steps": N}, "align": {...}, "sft": {...}}, what the arm tests). Arms are changes
# to configs/mini/base.py at HEAD (conv stem, 600-step pretrained tower, tower frozen in SFT, data v2). The first study's arms (v0, aug4, frozen, p8, ...: linear stem, no pretrained tower, data v1) are kept in
# bench/results/mini_base_study.json; rerun them from the commit the README names.
ARMS = {
    "base": (4, {}, "configs/mini/base.py as it is"),
    "no_tower": (4, {"tower": {"steps": 0}}, "conv stem aligned from scratch through the caption loss"),
    "linear_stem": (4, {"align": {V + "patch_stem": "linear"}}, "pretrained tower with the linear patchify"),
    "sft_tower": (4, {"sft": {"train.trainable": (".*",)}}, "tower trained in SFT too"),
    "sft250": (4, {"sft": {"train.steps": 250}}, "250 SFT steps (the default before 2026-12-02)"),
    "balanced": (4, {"data": {"keep_absent": 0.25}}, "'absent' yes/no questions kept with p 0.25 (balanced answers)"),
    "no_imagine": (4, {"data": {"imagine_every": 0}, "sft": {"train.steps": 250}},
                   "no 'imagine' turns (wrong colour + shape answers) in SFT, 250 SFT steps"),
    "single_turn": (4, {"data": {"turns_per_sample": 1}},
                    "SFT conversations cut into one QA pair per sample (each asked with the image, as evaluated)"),
    "two_turns": (4, {"data": {"turns_per_sample": 2}}, "SFT conversations cut into samples of 2 QA pairs"),
    "balanced_long": (4, {"data": {"keep_absent": 0.25}, "sft": {"train.steps": 1000}},
                      "balanced yes/no answers and 1000 SFT steps: is the comparison learnable given more steps?"),
}


def sft_only(name: str) -> bool:
    """The arm changes only the SFT stage and its data (same views): its tower and align stages are `base`'s."""
    augment, over, _ = ARMS[name]
    return not set(over) - {"data", "sft"} and augment == ARMS["base"][0]


def same_tokenizer(name: str, source: str, cache: Path) -> None:
    """The tokenizer is fitted to the SFT texts, so a data option that changed them would leave a copied decoder
    reading other token ids: raise naming both files."""
    from vlmjax.recipes.mini_base import design_data

    toks = [design_data(cache, 0, ARMS[a][0], ARMS[a][1])[0] / "tokenizer" / "tokenizer.json" for a in (name, source)]
    if toks[0].read_bytes() != toks[1].read_bytes():
        raise SystemExit(f"--reuse-align {source} for arm {name}: the tokenizers differ: {toks[0]} vs {toks[1]}")


def run_arm(name: str, cache: Path, n: int, reuse_align: str | None = None) -> dict:
    from vlmjax.recipes.mini_base import build_base, evaluate_base

    augment, over, what = ARMS[name]
    t0 = time.time()
    reused = None
    if reuse_align and sft_only(name) and sft_only(reuse_align) and not (cache / name / "align" / "export").exists():
        src = cache / reuse_align
        same_tokenizer(name, reuse_align, cache)
        if not (src / "align" / "export").exists():
            raise SystemExit(f"--reuse-align {reuse_align}: {src / 'align' / 'export'} does not exist; run that arm first")
        for stage in ("tower", "align"):
            if (src / stage).exists():
                shutil.copytree(src / stage, cache / name / stage, dirs_exist_ok=True)
        reused = reuse_align
    base = build_base(cache, seed=0, augment=augment, over=over, root=cache / name, quiet=True)
    res = evaluate_base(base, n=n)
    st = base["stages"]
    return {"arm": name, "what": what, "augment": augment, "over": over,
            "steps": {s: st[s]["steps"] for s in st}, "loss_last": {s: round(st[s]["loss_last"], 4) for s in st},
            "train_seconds": round(sum(s["seconds"] for s in st.values()), 1),
            "train_cpu_seconds": round(sum(s["cpu_seconds"] for s in st.values()), 1),
            "build_seconds": base["seconds"], "build_cpu_seconds": base["cpu_seconds"],
            "arm_wall_seconds_this_call": round(time.time() - t0, 1), "tower_align_from": reused, "results": res}


def probe_arm(name: str, cache: Path, out: Path) -> dict:
    """Alignment only, then bench/mini_base_probe.py on its export: does the tower learn shape at all (a minute of
    probing instead of SFT + evaluation)?"""
    import mini_base_probe

    from vlmjax.recipes.mini_base import CONFIG, TOWER_STEPS, data_dir, prepare_data, pretrain_tower
    from vlmjax.train.stages import train_stage

    augment, over, _what = ARMS[name]
    data_kw = {k: over.get("data", {})[k] for k in ("keep_absent", "imagine_every") if k in over.get("data", {})}
    data = data_dir(cache, 0, augment, **data_kw)
    prepare_data(data, seed=0, augment=augment, **data_kw)
    steps = over.get("tower", {}).get("steps", TOWER_STEPS)
    if steps:
        pretrain_tower(data, cache / name / "tower", over=over.get("align"), steps=steps, quiet=True)
    align = train_stage("align", cache / name / "align", config_file=CONFIG, image_root=str(data / "images"),
                        source=str(data / "base_captions.jsonl"), tokenizer=str(data / "tokenizer"),
                        load_params=str(cache / name / "tower" / "tower.safetensors") if steps else None,
                        over={"train.seed": 0, "model.seed": 0, **over.get("align", {})}, quiet=True)
    mini_base_probe.main(["--model", str(align), "--out", str(out)])
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--n", type=int, default=300, help="easy-vqa test questions (n/3 described images)")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "mini_base_study")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mini_base_study.json")
    ap.add_argument("--reuse-align", default=None, metavar="ARM",
                    help="arms that change only the SFT stage copy ARM's trained tower and align stages (same tokenizer)")
    ap.add_argument("--probe-only", action="store_true", help="align each arm and probe its image tokens only")
    args = ap.parse_args(argv)
    if args.probe_only:
        for name in args.arms.split(","):
            probe_arm(name, args.cache, args.out.parent / f"mini_base_probe_{name}_align.json")
        return 0
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.arms.split(","):
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; arms: {', '.join(ARMS)}")
        row = run_arm(name, args.cache, args.n, args.reuse_align)
        table[f"{name}@n{args.n}"] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, args.out)
        r = row["results"]
        print(f"{name:8s} steps {row['steps']} cpu {row['train_cpu_seconds']:.0f}s wall {row['train_seconds']:.0f}s | "
              + " ".join(f"{k} {r[k]:.3f}" for k in ("accuracy", "shape", "color", "yes/no", "describe_both")),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
