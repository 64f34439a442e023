"""POINTS model soup reproduced in miniature (issue 18, `python -m vlmjax.recipes.points.miniature --part soup`).

    python -m vlmjax.recipes.points.miniature --part soup [--workdir runs/points_mini/soup]
        [--base-cache runs/mini_base] [--seeds 0] [--soup-steps 150] [--n-test 300] [--val-n 200] [--quick]

1. Start model = the lowest-PPL base: the filter part's lowest-PPL 20% arm export (seed 0) when that run is in
   `--filter-workdir`, else the shared mini base's *align* export (caption pre-training only). Not the base's SFT'd
   model: it has already been SFT'd on every question kind of images 3000-3999, so an ingredient's addition would
   add nothing it does not know, and the soup would average near-copies of it.
2. SFT data (easy-vqa train images SFT_IMAGES = 0-2999, the recipes' pool; conversations of `mini_base.sft_turns`,
   describe prompt varied, turns shuffled): Base = the description turn + the colour questions; each ingredient =
   Base + one addition: shape questions / yes-no questions about a colour / yes-no questions about a shape; plus
   Base + all three, and Base + shape at LRS (the lr soup). Same steps, batch and schedule for every run
   (configs/mini/base.py:sft, tower frozen).
3. Val = questions on held-out train images VAL_IMAGES = 3300-3499, never the test split. Those images are in the
   mini base's own pool (3000-3999): its align stage saw their captions (not these questions); no soup SFT sees
   them. Greedy soup (`points.soup.greedy`) ranks and accepts ingredients by val accuracy; uniform and lr soups are
   `points.soup.uniform` (= `convert.average`); the line between two ingredients is val at LINE points
   (`convert.average.average_into` with weights (1 - t, t)), to show they share a basin.
4. Test: easy-vqa test accuracy by kind (`eval.easy_vqa.evaluate_by_kind`) of every model and soup.
Seeds change SFT init order/data order; mean +- sd (`eval.report`), figures (`eval.plots`), WORKDIR/results/soup.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

SFT_IMAGES = (0, 3000)
VAL_IMAGES = (3300, 3500)
ADDITIONS = ("shape", "yes/no colour", "yes/no shape")
SLUG = {"shape": "shape", "yes/no colour": "yn_colour", "yes/no shape": "yn_shape"}
LR = 2e-3  # configs/mini/base.py:sft
LRS = (1e-3, 2e-3, 4e-3)
LINE = (0.0, 0.25, 0.5, 0.75, 1.0)
STEPS = 150
METRICS = ("accuracy", "color", "shape", "yes/no", "describe_both")
LABELS = {"accuracy": "all", "color": "colour q", "shape": "shape q", "yes/no": "yes/no q",
          "describe_both": "describes both"}


def question_kind(question: str, answer: str) -> str:
    """"color" / "shape" / "yes/no colour" / "yes/no shape" of an easy-vqa QA pair (a yes/no question names a shape
    or a colour; one naming neither is an error naming it)."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES
    from vlmjax.eval.easy_vqa import answer_kind

    kind = answer_kind(answer)
    if kind != "yes/no":
        return kind
    words = set(question.lower().replace("?", " ").split())
    if words & set(SHAPES):
        return "yes/no shape"
    if words & set(COLORS):
        return "yes/no colour"
    raise ValueError(f"yes/no question {question!r} names neither a shape nor a colour")


def conversations(records: list[dict], kinds, *, images=SFT_IMAGES, seed: int = 0) -> list[dict]:
    """llava SFT records: for each train image in `images`, its description turn + the colour questions + the QA
    pairs of `kinds` (question_kind), in a shuffled order (`mini_base.sft_turns`; the describe prompt varied)."""
    from vlmjax.recipes.mini_base import sft_turns

    keep = {"color", *kinds}
    out = []
    for rec in records:
        n = int(rec["id"].split("_")[1])
        if not images[0] <= n < images[1]:
            continue
        t = rec["conversations"]
        turns = t[:2] + [x for i in range(2, len(t), 2) for x in t[i:i + 2]
                         if question_kind(t[i]["value"], t[i + 1]["value"]) in keep]
        rng = np.random.default_rng([seed, n])
        out.append({"id": rec["id"], "image": rec["image"], "conversations": sft_turns(turns, rng)})
    if not out:
        raise ValueError(f"no train records of images {images}")
    return out


def val_questions(records: list[dict], out: Path, images=VAL_IMAGES) -> Path:
    """[question, answer, image_id] rows (easy-vqa's question-file layout) of the train images `images`."""
    rows = []
    for rec in records:
        n = int(rec["id"].split("_")[1])
        if images[0] <= n < images[1]:
            t = rec["conversations"]
            rows += [[t[i]["value"].replace("<image>\n", ""), t[i + 1]["value"], n] for i in range(2, len(t), 2)]
    if not rows:
        raise ValueError(f"no train questions on images {images}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows))
    return out


def start_model(base: dict, filter_work: Path | None) -> tuple[Path, str]:
    arm = Path(filter_work or "") / "arms" / "low20_seed0" / "pretrain" / "export"
    if filter_work is not None and (arm / "config.json").exists():
        return arm, f"filter part's lowest-PPL 20% arm (seed 0): {arm}"
    return Path(base["align"]), f"shared mini base's align export (no filter arm in {filter_work}): {base['align']}"


def sft_run(work: Path, data: Path, start: Path, base: dict, *, seed: int, steps: int, lr: float, over: dict) -> Path:
    from vlmjax.recipes import mini_base
    from vlmjax.train.stages import train_stage

    return train_stage("sft", work, config_file=mini_base.CONFIG, model_path=str(start), image_root=base["images"],
                       source=str(data), quiet=True,
                       over={"train.seed": seed, "model.seed": seed, "train.steps": steps, "optim.lr": lr, **over})


def line_vals(a: Path, b: Path, val, ts=LINE) -> list[float]:
    """val of (1 - t) a + t b at each t, in memory (one model loaded, `average_into`)."""
    from vlmjax.convert.average import average_into, open_sources
    from vlmjax.convert.native import load_folder

    sources = open_sources([a, b])
    model, _cfg, tok = load_folder(a, dtype="float32", param_dtype="float32")
    out = []
    for t in ts:
        average_into(model, sources, weights=[1 - t, t])
        out.append(float(val.fn(model, tok)))
    return out


def run_soup(work: Path, *, base_cache: Path | None = None, filter_work: Path | None = None, seeds=(0,),
             steps: int = STEPS, n_test: int = 300, val_n: int = 200, quick: bool = False, figures: bool = True,
             base: dict | None = None, stage_over: dict | None = None, images=SFT_IMAGES, lrs=LRS) -> dict:
    """The soup part end to end (module docstring); every step is skipped when its output exists (a rerun resumes).
    lrs: the lr soup's learning rates of Base + shape (LR among them reuses that ingredient)."""
    from vlmjax.eval import report
    from vlmjax.eval.easy_vqa import evaluate_by_kind
    from vlmjax.eval.tasks import easy_vqa_file
    from vlmjax.recipes.mini_base import base_gate
    from vlmjax.recipes.points import soup as S
    from vlmjax.recipes.mini_base import base_results, shared_base

    started, work = time.time(), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if quick:
        steps, n_test, val_n, images = min(steps, 4), min(n_test, 12), min(val_n, 12), (images[0], images[0] + 40)
    over = {k: v for k, v in (stage_over or {}).items() if not k.startswith("model.vlm.")}
    print("[1/5] base", flush=True)
    base = base or shared_base(base_cache, quick=quick)
    gate_ok, gate_lines = base_gate(base_results(base, work / "results" / f"base_n{n_test}.json", n_test))
    print("\n".join(gate_lines), flush=True)
    start, why = start_model(base, filter_work)
    print(f"  start model: {why}", flush=True)
    print("[2/5] SFT data and val", flush=True)
    records = json.loads((Path(base["data"]) / "train.json").read_text())
    data = {}
    for name, kinds in [("base", ()), *[(a, (a,)) for a in ADDITIONS], ("all", ADDITIONS)]:
        path = work / "data" / f"{SLUG.get(name, name)}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(conversations(records, kinds, images=images)))
        data[name] = path
    val_file = work / "data" / "val_questions.json"
    if not val_file.exists():
        val_questions(records, val_file)
    val = S.task_val(easy_vqa_file(val_file, Path(base["images"]) / "train", n=val_n, name="val_train3300"))
    per_seed: dict[str, list] = {}
    extra = {"seeds": {}}
    for s in seeds:
        print(f"[3/5] seed {s}: SFT runs ({steps} steps each)", flush=True)
        sd = work / f"seed{s}"
        run = lambda name, d, lr=LR: sft_run(sd / name, data[d], start, base, seed=s, steps=steps, lr=lr,  # noqa
                                             over=over)
        models = {"Base (colour + descriptions)": run("base", "base")}
        ingr = {f"Base + {a}": run(SLUG[a], a) for a in ADDITIONS}
        models.update(ingr)
        models["Base + all additions"] = run("all", "all")
        lr_runs = [ingr["Base + shape"] if lr == LR else run(f"shape_lr{lr:g}", "shape", lr) for lr in lrs]
        print(f"[4/5] seed {s}: soups", flush=True)
        S.uniform(list(ingr.values()), sd / "uniform")
        g = S.greedy(list(ingr.values()), sd / "greedy", val, log=lambda m: print(f"  {m}", flush=True))
        S.uniform(lr_runs, sd / "lr_soup")
        models.update({"uniform soup": sd / "uniform" / S.MODEL, "greedy soup": sd / "greedy" / S.MODEL,
                       f"lr soup (Base + shape, lr {'/'.join(f'{x:g}' for x in lrs)})": sd / "lr_soup" / S.MODEL})
        a, b = ingr["Base + shape"], ingr["Base + yes/no colour"]
        line_path = sd / "results" / "line.json"
        if not line_path.exists():
            line_path.parent.mkdir(parents=True, exist_ok=True)
            line_path.write_text(json.dumps({"t": list(LINE), "val": line_vals(a, b, val), "a": str(a), "b": str(b)}))
        line = json.loads(line_path.read_text())
        for name, m in models.items():
            r = evaluate_by_kind(m, sd / "results" / f"{name.split(' (')[0].replace(' ', '_').replace('/', '')}"
                                 f"_n{n_test}.json", n=n_test)
            per_seed.setdefault(name, []).append({k: r[k] for k in METRICS if k in r})
        for t, v in zip(line["t"], line["val"]):
            per_seed.setdefault(f"line t={t:g}", []).append({"val": v})
        extra["seeds"][s] = {"greedy": {k: g[k] for k in ("order", "trials", "members", "soup_val", "best_single")},
                             "line": line}
        print(f"  greedy soup members: {[Path(p).parent.name for p in g['members']]}, val {g['soup_val']:.3f}",
              flush=True)
    print("[5/5] report", flush=True)
    agg = report.aggregate(per_seed)
    test_agg = {k: v for k, v in agg.items() if not k.startswith("line")}
    table = report.markdown_table(test_agg, METRICS, labels=LABELS)
    line_table = report.markdown_table({k: v for k, v in agg.items() if k.startswith("line")}, ["val"])
    out = {"gate": {"passed": gate_ok, "lines": gate_lines}, "start_model": why, "per_seed": per_seed,
           "rows": {a: {m: st._asdict() for m, st in v.items()} for a, v in agg.items()}, "table": table,
           "line_table": line_table, **extra,
           "config": {"seeds": list(seeds), "steps": steps, "n_test": n_test, "val_n": val_n, "quick": quick,
                      "sft_images": list(images), "val_images": list(VAL_IMAGES), "lrs": list(lrs),
                      "base": base["root"], "val": val.name}}
    if figures:
        from vlmjax.eval import plots

        fig = work / "figures"
        out["figures"] = {
            "test": plots.bar_chart(test_agg, METRICS, fig / "test_by_kind.png", labels=LABELS,
                                    title="POINTS soup miniature: easy-vqa test accuracy by kind"),
            "line": plots.bar_chart({k: v for k, v in agg.items() if k.startswith("line")}, ["val"],
                                    fig / "line.png", title="val accuracy on (1-t) Base+shape + t Base+yes/no colour")}
    report.write_results(work / "results" / "soup.json", out, meta=report.run_meta(started))
    print("\n".join(gate_lines) + f"\nstart model: {why}\n{table}\n\nval along the line:\n{line_table}")
    return out
