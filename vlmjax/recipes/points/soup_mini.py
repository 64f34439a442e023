"""POINTS model soup reproduced in miniature (issue 18, `python -m vlmjax.recipes.points.miniature --part soup`).

    python -m vlmjax.recipes.points.miniature --part soup [--workdir runs/points_mini/soup]
        [--base-cache runs/mini_base] [--seeds 0] [--soup-steps 150] [--ingredient-steps 80] [--ingredient-lr 1e-3]
        [--n-test 300] [--val-n 200] [--quick]

Model soups (Wortsman et al., 2022) average fine-tunes of ONE shared model, so the ingredients stay in one basin.
1. Start model = the lowest-PPL base: the filter part's lowest-PPL 20% arm export (seed 0) when that run is in
   `--filter-workdir`, else the shared mini base's *align* export (caption pre-training only). Not the base's SFT'd
   model: it has already been SFT'd on every question kind of images 3000-3999, so an ingredient's addition would
   add nothing it does not know, and the soup would average near-copies of it.
2. SFT data (easy-vqa train images SFT_IMAGES = 0-2999, the recipes' pool; conversations of `mini_base.sft_turns`,
   describe prompt varied, turns shuffled): Base = the description turn + the colour questions; an ingredient's =
   Base + one addition: shape questions / yes-no questions about a colour / yes-no questions about a shape.
3. Phase 1, "Base SFT": ONE run from the start model on the Base data (`steps`, lr BASE_LR).
   Phase 2: from the Base SFT export, every ingredient = a shorter fine-tune (`ingredient_steps`, lr
   `ingredient_lr`) on its data; Base + all three additions the same way; the lr soup's runs = Base + shape at
   lr/2, lr, 2 lr. Every run: configs/mini/base.py:sft (tower frozen; cosine, warmup 5%, ends at 0.1 lr, so a
   short fine-tune warms up for a few steps and decays over the rest).
4. Val = questions on held-out train images VAL_IMAGES = 3300-3499, never the test split. Those images are in the
   mini base's own pool (3000-3999): its align stage saw their captions (not these questions); no soup SFT sees
   them. Greedy soup (`points.soup.greedy`) ranks and accepts ingredients by val accuracy; uniform and lr soups are
   `points.soup.uniform` (= `convert.average`); the line between Base + shape and Base + yes/no colour is val at
   LINE points (`convert.average.average_into` with weights (1 - t, t)), beside the Base SFT model's val, to show
   whether they share a basin.
5. Test: easy-vqa test accuracy by kind (`eval.easy_vqa.evaluate_by_kind`) of every model and soup.
Seeds change SFT init order/data order; mean +- sd (`eval.report`), figures (`eval.plots`), WORKDIR/results/soup.json.
Layout: WORK/seed{s}_base{steps}/base (phase 1) and WORK/seed{s}_base{steps}/ft{isteps}_lr{lr} (phase 2: runs,
soups, results), so a rerun with other steps or lr trains anew and one with the same resumes.
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
BASE_LR = 2e-3  # configs/mini/base.py:sft
STEPS = 150  # phase 1 (Base SFT)
INGR_LR = 1e-3  # phase 2 (ingredients): half the Base SFT lr; 5e-4 learnt less (README, seed 0 val)
INGR_STEPS = 80
LINE = (0.0, 0.25, 0.5, 0.75, 1.0)
BASE_ROW = "Base SFT (colour + descriptions)"
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
    from vlmjax.convert.native import is_native

    arm = Path(filter_work or "") / "arms" / "low20_seed0" / "pretrain" / "export"
    if filter_work is not None and (is_native(arm) or (arm / "config.json").exists()):
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


def folder_val(folder: Path, val) -> float:
    from vlmjax.convert.native import load_folder

    model, _cfg, tok = load_folder(folder, dtype="float32", param_dtype="float32")
    return float(val.fn(model, tok))


def stage_info(export: Path) -> dict:
    """A run's stage.json (steps, seconds, first/last loss) without the loss curve."""
    info = json.loads((Path(export).parent / "stage.json").read_text())
    return {k: v for k, v in info.items() if k != "losses"}


def pin_start(seed_dir: Path, start: Path) -> None:
    """Phase 1 resumes only from the start model it began with (a filter run made later would silently mix)."""
    from vlmjax.eval.report import cached_json

    pinned = cached_json(seed_dir / "start.json", lambda: {"start": str(start)})["start"]
    if pinned != str(start):
        raise ValueError(f"{seed_dir} was trained from start model {pinned}, now {start}: use another --workdir")


def run_soup(work: Path, *, base_cache: Path | None = None, filter_work: Path | None = None, seeds=(0,),
             steps: int = STEPS, ingredient_steps: int = INGR_STEPS, ingredient_lr: float = INGR_LR,
             n_test: int = 300, val_n: int = 200, quick: bool = False, figures: bool = True,
             base: dict | None = None, stage_over: dict | None = None, images=SFT_IMAGES, lrs=None) -> dict:
    """The soup part end to end (module docstring); every step is skipped when its output exists (a rerun resumes).
    lrs: the lr soup's learning rates of Base + shape (default ingredient_lr / 2, x 1, x 2; ingredient_lr among them
    reuses that ingredient)."""
    from vlmjax.eval import report
    from vlmjax.eval.easy_vqa import evaluate_by_kind
    from vlmjax.eval.tasks import easy_vqa_file
    from vlmjax.recipes.mini_base import base_gate, base_results, shared_base
    from vlmjax.recipes.points import soup as S

    started, work = time.time(), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    lrs = tuple(lrs or (ingredient_lr / 2, ingredient_lr, ingredient_lr * 2))
    if quick:
        steps, ingredient_steps = min(steps, 4), min(ingredient_steps, 3)
        n_test, val_n, images = min(n_test, 12), min(val_n, 12), (images[0], images[0] + 40)
    over = {k: v for k, v in (stage_over or {}).items() if not k.startswith("model.vlm.")}
    print("[1/6] base", flush=True)
    base = base or shared_base(base_cache, quick=quick)
    gate_ok, gate_lines = base_gate(base_results(base, work / "results" / f"base_n{n_test}.json", n_test))
    print("\n".join(gate_lines), flush=True)
    start, why = start_model(base, filter_work)
    print(f"  start model: {why}", flush=True)
    print("[2/6] SFT data and val", flush=True)
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
    lr_name = f"lr soup (Base + shape, lr {'/'.join(f'{x:g}' for x in lrs)})"
    per_seed: dict[str, list] = {}
    extra = {"seeds": {}, "stages": {}}
    for s in seeds:
        sd = work / f"seed{s}_base{steps}"
        ft = sd / f"ft{ingredient_steps}_lr{ingredient_lr:g}"
        sd.mkdir(parents=True, exist_ok=True)
        pin_start(sd, start)
        print(f"[3/6] seed {s}: Base SFT from the start model ({steps} steps, lr {BASE_LR:g})", flush=True)
        base_sft = sft_run(sd / "base", data["base"], start, base, seed=s, steps=steps, lr=BASE_LR, over=over)
        print(f"[4/6] seed {s}: ingredients from Base SFT ({ingredient_steps} steps, lr {ingredient_lr:g})",
              flush=True)
        run = lambda name, d, lr=ingredient_lr: sft_run(ft / name, data[d], base_sft, base, seed=s, lr=lr,  # noqa
                                                        steps=ingredient_steps, over=over)
        ingr = {f"Base + {a}": run(SLUG[a], a) for a in ADDITIONS}
        models = {BASE_ROW: base_sft, **ingr, "Base + all additions": run("all", "all")}
        lr_runs = [ingr["Base + shape"] if lr == ingredient_lr else run(f"shape_lr{lr:g}", "shape", lr) for lr in lrs]
        print(f"[5/6] seed {s}: soups", flush=True)
        S.uniform(list(ingr.values()), ft / "uniform")
        g = S.greedy(list(ingr.values()), ft / "greedy", val, log=lambda m: print(f"  {m}", flush=True))
        lr_dir = ft / f"lr_soup_{'_'.join(f'{x:g}' for x in lrs)}"
        S.uniform(lr_runs, lr_dir)
        models.update({"uniform soup": ft / "uniform" / S.MODEL, "greedy soup": ft / "greedy" / S.MODEL,
                       lr_name: lr_dir / S.MODEL})
        a, b = ingr["Base + shape"], ingr["Base + yes/no colour"]
        line = report.cached_json(ft / "results" / "line.json", lambda: {
            "t": list(LINE), "val": line_vals(a, b, val), "a": str(a), "b": str(b), "base_sft_val": folder_val(
                base_sft, val), "val_task": val.name})
        for name, m in models.items():
            res = (sd if m == base_sft else ft) / "results"
            slug = lr_dir.name if name == lr_name else name.split(" (")[0].replace(" ", "_").replace("/", "")
            r = evaluate_by_kind(m, res / f"{slug}_n{n_test}.json", n=n_test)
            per_seed.setdefault(name, []).append({k: r[k] for k in METRICS if k in r})
        per_seed.setdefault("Base SFT (the ingredients' start)", []).append({"val": line["base_sft_val"]})
        for t, v in zip(line["t"], line["val"]):
            end = {0.0: " (Base + shape)", 1.0: " (Base + yes/no colour)"}.get(t, "")
            per_seed.setdefault(f"line t={t:g}{end}", []).append({"val": v})
        extra["seeds"][s] = {"greedy": {k: g[k] for k in ("order", "trials", "members", "soup_val", "best_single")},
                             "line": line}
        trained = dict.fromkeys([base_sft, *ingr.values(), models["Base + all additions"], *lr_runs])
        extra["stages"][s] = {str(Path(m).parent.relative_to(work)): stage_info(m) for m in trained}
        print(f"  greedy soup members: {[Path(p).parent.name for p in g['members']]}, val {g['soup_val']:.3f}; "
              f"line val {[round(v, 3) for v in line['val']]}, Base SFT val {line['base_sft_val']:.3f}", flush=True)
    print("[6/6] report", flush=True)
    agg = report.aggregate(per_seed)
    val_agg = {k: v for k, v in agg.items() if list(v) == ["val"]}
    test_agg = {k: v for k, v in agg.items() if k not in val_agg}
    table = report.markdown_table(test_agg, METRICS, labels=LABELS)
    line_table = report.markdown_table(val_agg, ["val"])
    out = {"gate": {"passed": gate_ok, "lines": gate_lines}, "start_model": why, "per_seed": per_seed,
           "rows": {a: {m: st._asdict() for m, st in v.items()} for a, v in agg.items()}, "table": table,
           "line_table": line_table, **extra,
           "config": {"seeds": list(seeds), "steps": steps, "base_lr": BASE_LR, "ingredient_steps": ingredient_steps,
                      "ingredient_lr": ingredient_lr, "n_test": n_test, "val_n": val_n, "quick": quick,
                      "sft_images": list(images), "val_images": list(VAL_IMAGES), "lrs": list(lrs),
                      "base": base["root"], "val": val.name}}
    if figures:
        from vlmjax.eval import plots

        fig = work / "figures"
        out["figures"] = {
            "test": plots.bar_chart(test_agg, METRICS, fig / "test_by_kind.png", labels=LABELS,
                                    title="POINTS soup miniature: easy-vqa test accuracy by kind"),
            "line": plots.bar_chart(val_agg, ["val"], fig / "line.png",
                                    title="val: Base SFT, and the line")}
    report.write_results(work / "results" / "soup.json", out, meta=report.run_meta(started))
    print("\n".join(gate_lines) + f"\nstart model: {why}\n{table}\n\nval along the line:\n{line_table}")
    return out
