"""VILA^2 reproduced in miniature (issue 20): does the SFT'd model's recaptioning put back what the pre-training
captions lack?

    python -m vlmjax.recipes.vila2.miniature [--rounds 3] [--seeds 0 1 2] [--workdir runs/vila2_mini]
                                             [--base-cache runs/mini_base] [--quick] [--ablations [ARM ..]]
                                             [--no-oracle]

Mechanism under test: the pre-training captions are too short to carry what SFT teaches (each says the shape, or
the colour, or nothing), so the SFT'd model's recaptions add it, and retraining from scratch on caption + recaption
gives a better model. Data (`vila2.mini_data`): pairs = easy-vqa train images 0-2999 with one under-informative
caption each; SFT = images 3000-3299 (QA + descriptions asked with the 3 recaption prompts); test = the easy-vqa
test split. Model (configs/vila2/mini.py): the mini base's shape, its pretrained tower (`mini_base.pretrain_tower`,
reused from the shared base's cache as the VILA miniature does) + a fresh decoder, align then SFT, every round.
The rounds are `vila2.loop.run_loop` (the real-scale driver): round 0 = VILA^0 on the poor captions; round k =
VILA^{k-1} recaptions (sampled, continuous batching), combine (concat), retrain from scratch, eval. The oracle row
trains once on the true full captions (the ceiling). `--ablations` (all, or the arms named): replace instead of
concat (round 1), recaptions by the aligned-only model (no SFT; round 1), no recaption but 2x steps, and the shape
specialist (`vila2.specialist`): the last round's model fine-tuned on shape QA of the SFT images answers "What shape
is in the image?" about every image of that round's captions, the answers are appended as a QA turn, and the
generalist is retrained from scratch on them with the same steps.

Printed first: the base gate (`mini_base.base_gate` on the shared base's cached results, when present) and the
information gate (round 0's captions carry colour + shape for ~0% of images; round 1's recaptions must be right on
both for clearly more). Then mean +- sd over seeds per round (Welch marks vs round 0), figures in
WORKDIR/figures/*.png and WORKDIR/results/miniature.json (with run_meta). Every step resumes (state.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from vlmjax.recipes.vila2 import loop as L
from vlmjax.recipes.vila2 import mini_data
from vlmjax.train.config_io import load_module

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "configs" / "vila2" / "mini.py"
MIN_HEADROOM = 0.05  # the oracle's eval average must beat round 0's by this much (`headroom_gate`)
MIN_R1_BOTH = 0.2  # round 1's recaptions must be right on colour + shape for at least this much more than round 0
METRICS = ("cap_both", "recap_both", "qa_shape", "words", "align_color", "align_shape", "accuracy", "shape", "color",
           "yes/no", "describe_both", "seconds", "cpu_seconds")
LABELS = {"cap_both": "caption has colour+shape", "recap_both": "recaption right on both", "words": "words / caption",
          "qa_shape": "specialist QA names the shape", "align_color": "align probe colour",
          "align_shape": "align probe shape", "accuracy": "easy-vqa acc.", "shape": "shape q.", "color": "colour q.",
          "yes/no": "yes/no q.", "describe_both": "describes colour+shape", "seconds": "s", "cpu_seconds": "CPU s"}


def base_gate_lines(cache: Path | None, base: dict | None, seed: int) -> tuple[bool | None, list[str]]:
    """The shared base's gate on its cached results (never evaluated here); (None, [why]) when there are none."""
    from vlmjax.recipes import mini_base

    root = Path(base["root"]) if base is not None else mini_base.base_root(cache, seed)
    cached = sorted(root.glob("results/base_n*.json"), key=lambda p: int(p.stem[len("base_n"):]))
    if not cached:
        return None, [f"mini base gate: no cached results in {root / 'results'}: not checked (the miniature reuses only "
                      "the base's tower)"]
    return mini_base.base_gate(json.loads(cached[-1].read_text()))


def info_gate(rows: dict) -> tuple[bool, str]:
    """Round 0's training captions carry colour + shape for ~0% of images; round 1's recaptions must be right on both
    for clearly more (MIN_R1_BOTH), else no round can add information."""
    if "round 0" not in rows:
        return False, "information gate: round 0 has not finished"
    r0 = rows["round 0"]["cap_both"]
    r1 = rows.get("round 1", {}).get("recap_both")
    if r1 is None:
        return False, f"information gate: round 0 captions carry colour + shape for {r0:.1%}; round 1 not run"
    ok = r1 >= r0 + MIN_R1_BOTH
    line = (f"information gate: round 0 captions carry colour + shape for {r0:.1%} of images, round 1's recaptions "
            f"are right on both for {r1:.1%}")
    named = [(rows["round 1"].get("recap_if_named", {}).get(a), a, c) for a, c in (("color", 8), ("shape", 3))]
    if all(v is not None for v, _, _ in named):
        said = [f"{a.replace('color', 'colour')} {v:.1%}, chance {1 / c:.1%}" for v, a, c in named]
        line += " (right when named: " + ", ".join(said) + ")"
    return ok, line + (" - ok, the recaptions add information" if ok else
                       f" - FAIL (< +{MIN_R1_BOTH:.0%}): the recaptions cannot add information; rounds below are not "
                       "the mechanism's test")


def headroom_gate(per_seed: dict) -> tuple[bool | None, str]:
    """Do the pre-training captions limit the final model at all? The oracle (true full captions) must beat round 0
    (the poor captions) by MIN_HEADROOM on the eval average (easy-vqa accuracy, describes colour + shape), the mean
    of the per-seed differences; else no recaption, however right, can show a gain downstream."""
    if "oracle (true full captions)" not in per_seed or "round 0" not in per_seed:
        return None, "headroom gate: needs round 0 and the oracle: not checked"
    avg = lambda r: (r["accuracy"] + r["describe_both"]) / 2  # noqa: E731
    diffs = [avg(o) - avg(r) for o, r in zip(per_seed["oracle (true full captions)"], per_seed["round 0"])]
    gap = float(np.mean(diffs))
    ok = gap >= MIN_HEADROOM
    line = (f"headroom gate: oracle - round 0 on the eval average (accuracy, describes colour + shape) = {gap:+.3f} "
            f"(per seed {', '.join(f'{d:+.3f}' for d in diffs)})")
    return ok, line + (" - ok, better pre-training captions would show downstream" if ok else
                       f" - FAIL (< {MIN_HEADROOM}): with true full captions the final model is no better, so the "
                       "pre-training captions do not limit it and the rounds cannot show a gain")


def round_rows(out: Path, summary: dict, captions: str, probe_n: int = 200) -> dict:
    """{"round k": metrics}: the training captions' and recaptions' correctness vs the true attributes and words,
    the align export's caption-likelihood probe (`mini_probe`, cached in the round folder), the eval and the
    round's seconds."""
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.recipes.vila2.mini_probe import align_probe

    rows = {}
    for k, entry in summary["rounds"].items():
        k = int(k)
        path = captions if k == 0 else L.combined_path(out, k)
        recs = list(read_jsonl(path, key=None))
        caps = mini_data.caption_scores(recs, "caption")
        row = {"cap_color": caps["color"], "cap_shape": caps["shape"], "cap_both": caps["both"],
               "words": caps["words"]}
        if k > 0:
            rec = mini_data.caption_scores(recs, "recaption")
            row.update(recap_color=rec["color"], recap_shape=rec["shape"], recap_both=rec["both"],
                       recap_words=rec["words"],  # a dict, so the seed aggregate skips it (None when none named)
                       recap_if_named={"color": rec["color_if_named"], "shape": rec["shape_if_named"]})
        align = entry.get("train", {}).get("exports", {}).get("align")
        if align:
            probe = align_probe(align, L.round_dir(out, k) / "align_probe.json", n=probe_n)
            row.update(align_color=probe["color"], align_shape=probe["shape"])
        ev = entry.get("eval", {}).get("metrics", {})
        row.update({m: ev[m] for m in ("accuracy", "shape", "color", "yes/no", "describe_color", "describe_shape",
                                       "describe_both") if m in ev})
        row.update(seconds=entry["seconds"], cpu_seconds=entry["cpu_seconds"])
        rows[f"round {k}"] = row
    return rows


def recaptions_so_far(out: Path, round_: int, pairs: Path) -> list[dict]:
    """Round `round_`'s recaptions written so far (recaptions.r{k}.jsonl, a torn last line skipped), each with its
    image's true colour and shape from `pairs` and its original caption: [{id, image, color, shape, caption,
    recaption}]."""
    from vlmjax.generate.jsonl import read_jsonl

    path = Path(L.combined_path(out, round_).replace("combined", "recaptions"))
    if not path.exists():
        return []
    truth = read_jsonl(pairs)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a run still writing
        t = truth.get(str(r["id"]))
        if t is not None:
            rows.append({"id": r["id"], "image": t["image"], "color": t["color"], "shape": t["shape"],
                         "caption": t["caption"], "recaption": r.get("output")})
    return rows


def seed_round0(src: Path, dst: Path) -> None:
    """An ablation's folder starts at round 1 from the main run's finished round 0 (its state entry, not a copy of
    the models)."""
    from vlmjax.recipes.vila2.state import RunState

    if RunState(dst).entry(0) is not None:
        return
    st = RunState(dst)
    st.data["rounds"]["0"] = RunState(src).entry(0)
    st.data["round"] = 0
    st.save()


ABLATIONS = ("replace", "aligned", "steps2x", "specialist")


def arms_of(ablations) -> tuple[str, ...]:
    """`ablations`: False (none), True (all) or names among ABLATIONS."""
    if ablations is True:
        return ABLATIONS
    chosen = tuple(ablations or ())
    unknown = [a for a in chosen if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}: one of {ABLATIONS}")
    return chosen


def specialist_arm(spec, main: Path, root: Path, data: Path, parts: dict, summary: dict, gen, probe_n: int = 200):
    """The shape specialist (`vila2.specialist`, the real-scale path): the last round's SFT'd model fine-tuned on
    shape QA of the SFT images, asked SHAPE_PROMPT about every image of that round's training captions; its answers
    appended as a QA turn; the generalist retrained from scratch on them (round 0 of a loop on the appended
    captions: the same stages and steps) and evaluated; its seconds include the specialist's training and answers.
    -> (row name, row, loop summary)."""
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.generate import default_eos_ids, load_model
    from vlmjax.generate.jsonl import read_jsonl, write_json_atomic
    from vlmjax.recipes.vila2 import specialist as S

    t0, cpu0 = time.time(), time.process_time()
    last = summary["last"]
    entry = summary["rounds"][str(last)]
    captions = entry["train"]["captions"]
    qa = mini_data.build_shape_qa(data, Path(parts["data"]))
    export = S.train_specialist(CONFIG, entry["train"]["exports"]["sft"], qa, parts["images"],
                                main / "specialists" / "shape" / f"train.r{last}", steps_scale=spec.steps_scale,
                                over={**spec.over.get("all", {}), **spec.over.get("specialist", {})})
    model, cfg, tok = load_model(str(export))
    gen = L.dataclasses.replace(gen, eos_token_ids=default_eos_ids(tok, cfg))
    source = SourceSpec(format="caption", path=str(captions), image_root=spec.image_root)
    S.recaption_specialist(model, tok, source, main, last, "shape", f"shape-specialist-of-{L.model_name(last)}", gen,
                           prompts=(mini_data.SHAPE_PROMPT,), batch_size=spec.batch_size, shard_index=0,
                           shard_count=1, progress=False)
    manifest = S.append(SourceSpec(format="caption", path=str(captions)), main, last, ["shape"])
    cost = Path(S.specialist_dir(main, "shape")) / f"cost.r{last}.json"  # kept: a rerun skips the steps it times
    if not cost.exists():
        write_json_atomic(cost, {"seconds": time.time() - t0, "cpu_seconds": time.process_time() - cpu0})
    spent = json.loads(cost.read_text())
    arm = L.dataclasses.replace(spec, captions=manifest["out"], caption_format="caption_qa")
    out = root / f"abl_specialist_r{last}"  # another last round: other captions, another run
    s = L.run_loop(arm, out, 0, quiet=True)
    row = round_rows(out, s, str(out / "captions.r0.jsonl") if spec.limit else manifest["out"], probe_n)["round 0"]
    recs = list(read_jsonl(manifest["out"], key=None))
    answers = [{**r, "qa": next((t["value"] for t in r["conversations"][::-1] if t["from"] == "gpt"), None)}
               for r in recs]
    row.update(qa_shape=mini_data.caption_scores(answers, "qa")["shape"],
               qa_appended=manifest["specialists"]["shape"]["appended"] / max(1, manifest["written"]),
               **{k: round(row[k] + v, 1) for k, v in spent.items()})  # + training and asking the specialist
    return f"round {last} + shape specialist QA", row, s


def run(root: Path, *, seed: int = 0, rounds: int = 3, quick: bool = False, base: dict | None = None,
        base_cache: Path | None = None, base_seed: int = 0, n_eval: int = 300, oracle: bool = True,
        ablations=False, over: dict | None = None, min_gain: float | None = None, on_step=None,
        report_only: bool = False, sft_images: int | None = None, sft_describe: int | None = None) -> dict:
    """One seed: data, the loop (rounds 0..rounds), the oracle and the ablations (`arms_of`). base: a
    `mini_base.build_base` dict (the test suite's tiny base); over: {stage or "all": {dotted: value}} added to every
    run's stages; report_only: train nothing, report the rounds (and oracle) that have finished."""
    from vlmjax.eval.easy_vqa import evaluate_by_kind
    from vlmjax.generate import GenerationConfig, SamplingConfig
    from vlmjax.recipes.vila.miniature import base_parts

    started, cpu0 = time.time(), time.process_time()
    root = Path(root)
    if base is not None:
        parts = {"data": base["data"], "images": base["images"],
                 "tower": str(Path(base["root"]) / "tower" / "tower.safetensors")}
    else:
        parts = base_parts(Path(base_cache or root.parent / "mini_base"), seed=base_seed, quick=quick)
    data = root / "data"
    if sft_images is not None and not 0 < int(sft_images) <= mini_data.SFT[1] - mini_data.SFT[0]:
        raise ValueError(f"sft_images={sft_images}: the SFT pool is images {mini_data.SFT[0]}-{mini_data.SFT[1] - 1}")
    sft = mini_data.SFT if sft_images is None else (mini_data.SFT[0], mini_data.SFT[0] + int(sft_images))
    if sft_describe is not None and int(sft_describe) < 0:
        raise ValueError(f"sft_describe={sft_describe}: a number of SFT images (>= 0)")
    info = mini_data.build(data, Path(parts["data"]), seed=seed, sft=sft, describe=sft_describe)
    print(f"[seed {seed}] data: {info}", flush=True)
    n_eval = 16 if quick else n_eval
    gen = GenerationConfig(max_new_tokens=8 if quick else 24, sampling=SamplingConfig(temperature=0.7),
                           slots=8 if quick else 64, seed=seed)
    over = over or {}
    spec = L.LoopSpec(
        config_file=str(CONFIG), stages=("align", "sft"), captions=str(data / "pairs.jsonl"),
        image_root=parts["images"], caption_stages=("align",),
        sources={"sft": {"path": str(data / "sft.json"), "image_root": parts["images"]}},
        first={"tokenizer": str(Path(parts["data"]) / "tokenizer"), "load_params": parts["tower"]},
        over={"all": {"train.seed": seed, "model.seed": seed, **over.get("all", {})},
              **{k: v for k, v in over.items() if k != "all"}},
        steps_scale=0.02 if quick else 1.0, generation=gen, limit=24 if quick else None,
        eval_fn=lambda model, out: evaluate_by_kind(model, out, n=n_eval), average=("accuracy", "describe_both"))
    main = root / "loop"
    summary = (L.finished(main) if report_only else
               L.run_loop(spec, main, rounds, min_gain=min_gain, on_step=on_step))
    captions0 = str(main / "captions.r0.jsonl") if spec.limit else spec.captions
    rows = round_rows(main, summary, captions0, n_eval)
    runs = {"loop": summary}
    if oracle and report_only and not L.finished(root / "oracle")["rounds"]:
        oracle = False
    if oracle:
        ospec = L.dataclasses.replace(spec, captions=str(data / "oracle.jsonl"))
        o = L.finished(root / "oracle") if report_only else L.run_loop(ospec, root / "oracle", 0)
        orow = round_rows(root / "oracle", o, str(root / "oracle" / "captions.r0.jsonl") if spec.limit
                          else str(data / "oracle.jsonl"), n_eval)["round 0"]
        rows["oracle (true full captions)"] = orow
        runs["oracle"] = o
    chosen = arms_of(ablations)
    if chosen and not report_only:
        arms = {"replace (round 1)": ("replace", L.dataclasses.replace(spec, mode="replace"), 1),
                "recaptions by aligned-only model (round 1)":
                    ("aligned", L.dataclasses.replace(spec, recaption_stage="align", prompts=None), 1),
                "no recaption, 2x steps": ("steps2x", L.dataclasses.replace(spec, steps_scale=2 * spec.steps_scale), 0)}
        for name, (key, arm, n) in arms.items():
            if key not in chosen or (n and rounds < 1):
                continue
            d = root / ("abl_" + name.split(" ")[0].replace(",", ""))
            if n:
                seed_round0(main, d)
            s = L.run_loop(arm, d, n, quiet=True)
            r = round_rows(d, s, captions0 if n else (str(d / "captions.r0.jsonl") if spec.limit else spec.captions),
                           n_eval)
            rows[name] = r[f"round {n}"]
            runs[name] = s
        if "specialist" in chosen:
            name, row, s = specialist_arm(spec, main, root, data, parts, summary, gen, n_eval)
            rows[name] = row
            runs[name] = s
    gate_rows = dict(rows)
    partial = recaptions_so_far(main, 1, data / "pairs.jsonl")
    if "round 1" not in rows and partial:  # round 1 recaptioning or training: its recaptions so far
        rec = mini_data.caption_scores(partial, "recaption")
        gate_rows["round 1"] = {**{f"recap_{k}": v for k, v in rec.items()}, "n": len(partial),
                                "recap_if_named": {"color": rec["color_if_named"], "shape": rec["shape_if_named"]}}
    passed, gate = info_gate(gate_rows)
    out = {"seed": seed, "rows": rows, "info_gate": {"passed": passed, "line": gate}, "data": info,
           "round1_recaptions": gate_rows.get("round 1"),
           "stopped": summary["stopped"], "quick": quick,
           # the rows' own seconds (what training, recaptioning and evaluating took, whichever invocation ran them)
           "seconds": round(sum(r["seconds"] for r in rows.values()), 1),
           "cpu_seconds": round(sum(r["cpu_seconds"] for r in rows.values()), 1),
           "invocation": {"seconds": round(time.time() - started, 1),
                          "cpu_seconds": round(time.process_time() - cpu0, 1)},
           "config": {"config_file": str(CONFIG), "over": over, "rounds": rounds, "n_eval": n_eval,
                      "generation": {"max_new_tokens": gen.max_new_tokens, "temperature": gen.sampling.temperature,
                                     "slots": gen.slots}}}
    (root / "results").mkdir(parents=True, exist_ok=True)
    (root / "results" / "miniature.json").write_text(json.dumps(out, indent=1))
    print(f"[seed {seed}] {gate}", flush=True)
    return out


def run_seeds(root: Path, *, seeds=(0, 1, 2), figures: bool = True, base: dict | None = None,
              base_cache: Path | None = None, base_seed: int = 0, figures_dir: Path | None = None, **kw) -> dict:
    """`run` per seed in ROOT/seed{S}, then the report: gates first, mean +- sd per round (Welch '*' vs round 0),
    figures and ROOT/results/miniature.json with run_meta."""
    from vlmjax.eval import report

    started = time.time()
    root = Path(root)
    cache = Path(base_cache or root.parent / "mini_base")
    runs = {s: run(root / f"seed{s}", seed=s, base=base, base_cache=cache, base_seed=base_seed, **kw) for s in seeds}
    # rows every seed has (a report of runs still going leaves out what some seeds have not finished)
    per_seed = {name: [r["rows"][name] for r in runs.values()] for name in runs[seeds[0]]["rows"]
                if all(name in r["rows"] for r in runs.values())}
    agg = report.aggregate(per_seed)
    table = report.markdown_table(agg, METRICS, baseline="round 0", labels=LABELS)
    passed, lines = base_gate_lines(cache, base, base_seed)
    info = [f"seed {s}: {r['info_gate']['line']}" for s, r in runs.items()]
    headroom_ok, headroom = headroom_gate(per_seed)
    info.append(headroom)
    out = {"rows": {k: {m: st._asdict() for m, st in v.items()} for k, v in agg.items()}, "per_seed": per_seed,
           "base_gate": {"passed": passed, "lines": lines},
           "info_gate": {"passed": [r["info_gate"]["passed"] for r in runs.values()], "lines": info[:-1]},
           "headroom_gate": {"passed": headroom_ok, "line": headroom},
           "table": table, "seeds": list(seeds), "base_seed": base_seed,
           "stopped": {s: r["stopped"] for s, r in runs.items()},
           "seconds": round(sum(r["seconds"] for r in runs.values()), 1),
           "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs.values()), 1),
           "config": {**runs[seeds[0]]["config"], **{k: v for k, v in kw.items() if k != "on_step"}}}
    if figures:
        out["figures"] = draw_figures(root, agg, seeds[0], Path(figures_dir or root / "figures"))
    report.write_results(root / "results" / "miniature.json", out, meta=report.run_meta(started))
    print("\n".join(lines + info))
    print(table)
    print(f"({out['seconds']:.0f} s wall, {out['cpu_seconds']:.0f} CPU s for {len(seeds)} seeds)")
    for path in out.get("figures", {}).values():
        print(f"figure: {path}")
    return out


def draw_figures(root: Path, agg: dict, seed: int, fig: Path) -> dict:
    """Bars per round (sd error bars), seed `seed`'s stage losses (round 0, the last round, the oracle) and an image
    grid of original caption vs the round-1 and last-round recaptions."""
    from vlmjax.eval import plots

    sroot = root / f"seed{seed}"
    main = sroot / "loop"
    last = max((int(p.name[5:]) for p in main.glob("round[0-9]*") if (p / "sft" / "metrics.jsonl").exists()),
               default=0)
    curves = {f"round {k} {st}": main / f"round{k}" / st / "metrics.jsonl" for k in sorted({0, last})
              for st in ("align", "sft")}
    curves.update({f"oracle {st}": sroot / "oracle" / "round0" / st / "metrics.jsonl" for st in ("align", "sft")})
    out = {"results": plots.bar_chart(agg, ("cap_both", "recap_both", "accuracy", "shape", "color", "describe_both"),
                                      fig / "rounds.png", labels=LABELS, baseline="round 0",
                                      title="VILA^2 miniature: rounds (mean +- sd over seeds)"),
           "losses": plots.loss_curves({k: v for k, v in curves.items() if v.exists()}, fig / "losses.png",
                                       title=f"stage losses (seed {seed})")}
    first = recaptions_so_far(main, 1, sroot / "data" / "pairs.jsonl")[:8]
    if first:
        final = {r["id"]: r for r in recaptions_so_far(main, last, sroot / "data" / "pairs.jsonl")} if last > 1 else {}
        items = [(str(_image_root(sroot) / r["image"]),
                  [f"true: {r['color']} {r['shape']}", f"original: {r['caption']}", f"round 1: {r['recaption']}"]
                  + ([f"round {last}: {final.get(r['id'], {}).get('recaption')}"] if final else []))
                 for r in first]
        out["recaptions"] = plots.image_grid(items, fig / "recaptions.png",
                                             title="original caption vs recaptions (seed %d)" % seed)
    return out


def _image_root(seed_root: Path) -> Path:
    """The image root the seed's loop trained on (from its align stage's config)."""
    cfg = json.loads((seed_root / "loop" / "round0" / "align" / "config.json").read_text())
    return Path(cfg["data"]["sources"][0]["image_root"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/vila2_mini"))
    ap.add_argument("--rounds", type=int, default=3, help="self-augment rounds after round 0 (VILA^0 .. VILA^N)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="seeds (caption kinds, sampling, training), each in WORKDIR/seed{S}; mean +- sd table")
    ap.add_argument("--base-cache", type=Path, default=None,
                    help="the shared mini base's cache (its data and tower; default WORKDIR/../mini_base)")
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--n-eval", type=int, default=300, help="easy-vqa test questions per model (+ n/3 described)")
    ap.add_argument("--min-gain", type=float, default=None, help="stop a seed's loop when a round gains less")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything on 24 pairs (smoke run)")
    ap.add_argument("--ablations", nargs="*", choices=ABLATIONS, default=None,
                    help="extra arms (no names: all): replace / aligned-only recaptions / 2x steps / shape specialist")
    ap.add_argument("--sft-images", type=int, default=None,
                    help="SFT on the first N of images 3000-3299 (default all 300; a new --workdir per size)")
    ap.add_argument("--sft-describe", type=int, default=None,
                    help="only the first N SFT images keep their description turn (default: all): describing is "
                         "then learnt from the pre-training captions, which gives the rounds headroom (README)")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="a config override for one stage (align, sft, specialist) or all: e.g. sft:train.steps=100")
    ap.add_argument("--no-oracle", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: the report of what has finished (runs still going, or seeds run apart)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--figures", type=Path, default=None, help="figure folder (default WORKDIR/figures)")
    args = ap.parse_args(argv)
    try:  # the config's stages, read here (not at import) only when there is an override to check
        over = L.stage_overrides(args.set, ("all",) + load_module(str(CONFIG)).STAGES) if args.set else {}
    except ValueError as e:
        ap.error(str(e))
    if args.workdir.exists() and args.quick and (args.workdir / "results").exists():
        shutil.rmtree(args.workdir / "results")
    out = run_seeds(args.workdir, seeds=tuple(args.seeds), rounds=args.rounds, quick=args.quick,
                    base_cache=args.base_cache, base_seed=args.base_seed, n_eval=args.n_eval, oracle=not args.no_oracle,
                    ablations=True if args.ablations == [] else tuple(args.ablations or ()),
                    min_gain=args.min_gain, figures=not args.no_figures, figures_dir=args.figures,
                    report_only=args.report_only, sft_images=args.sft_images, sft_describe=args.sft_describe,
                    over=over)
    return 0 if all(out["info_gate"]["passed"]) else 1


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    raise SystemExit(main())
