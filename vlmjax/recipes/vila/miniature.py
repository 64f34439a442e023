"""VILA reproduced in miniature (issue 19): a text LM, alignment, the pre-training arms, then SFT with and without a
text-only blend; each model scored on held-out text perplexity, fact QA (the MMLU analogue), 0-/4-shot captioning
(pre-trained models) and easy-vqa by answer kind (SFT'd models).

    python -m vlmjax.recipes.vila.miniature [--workdir runs/vila_mini] [--seeds 0 1 2] [--quick] [--all]
                                            [--base-cache runs/mini_base] [--base-seed 0] [--figures DIR]

1. data (`vila.mini_data`): corpus C (openclipart metadata sentences + easy-vqa world facts, 10% held out), fact QA,
   interleaved documents of 3-6 images (easy-vqa recipe-pool images + rendered openclipart drawings) with each
   image before its caption, the same images as caption pairs, easy-vqa SFT conversations on the next 600 pool
   images; a tokenizer fitted to all of it.
2. tower: the shared mini base's pretrained tower (`mini_base.pretrain_tower`, the stand-in for CLIP), reused from
   its cache when built there (the same path as `mini_base.build_base`), else trained.
3. text_lm (configs/vila/mini.py): the decoder alone on C. GATE: held-out C perplexity far below an add-one unigram
   model's (numpy, fitted on C's training split); else the forgetting below is not readable.
4. align: tower + projector on the pairs, LLM frozen (its text perplexity must equal the text LM's: a check).
5. arms, equal steps, same images: (a) pairs, LLM frozen; (b) pairs, LLM unfrozen; (d) documents, LLM unfrozen;
   `--all` adds (e) = (b) + (d). (c), the documents cut into pairs, is (b) here: our pairs ARE the documents' images
   with their matched sentences. Each arm (and align, the text LM): held-out C perplexity, fact QA in the plain
   template, caption accuracy 0-shot and 4-shot (`mini_eval`).
6. SFT on easy-vqa QA after (a), (b), (d); "LLM frozen throughout" (after (a), projector only); after (d) with 20%
   text-only fact-QA records (the blend half, `llava` text-only, source `weight`); `--all`: (b) + blend, SFT after
   (e). Each: held-out C perplexity, fact QA (chat template), easy-vqa test accuracy by kind + describe.
7. report (`mini_report`): mean +- sd over seeds, Welch marks, the paper's comparisons against the seed spread,
   PNG figures, WORKDIR/results/miniature.json with run_meta.
Every step is skipped when its output exists, so a rerun resumes, and seeds can be run by separate invocations
(`--seeds 1`, `--seeds 2`, then `--seeds 0 1 2` reads them back and reports).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmjax.recipes.vila import mini_data, mini_eval
from vlmjax.train import stages

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "configs" / "vila" / "mini.py"
ARMS = {"a": ("pretrain_frozen", "pairs, LLM frozen"), "b": ("pretrain_pairs", "pairs"),
        "d": ("pretrain_docs", "interleaved documents"), "e": ("pretrain_mix", "pairs + documents")}
GATE_RATIO = 0.5  # the text LM's held-out perplexity must be at most this fraction of the unigram model's
PPL_LEN = 128
BLEND = 0.2  # the text-only share of the SFT blend's records (VILA: 1M FLAN beside the visual SFT data)
SHOTS = 4
N_CAPTION, N_VQA = 48, 150  # test images captioned per shot setting; easy-vqa test questions after SFT
METRICS = ("perplexity", "fact_qa", "caption_0shot", "caption_4shot", "accuracy", "shape", "color", "yes/no",
           "describe_both")


def base_parts(cache: Path, *, seed: int, quick: bool) -> dict:
    """{"data", "images", "tower"} of the shared mini base: its data folder and pretrained tower, reused when built
    (mini_base.build_base's paths), else built here (data, then the tower alone: not the base's align/SFT)."""
    from vlmjax.recipes import mini_base

    scale = 0.02 if quick else 1.0
    data = mini_base.data_dir(cache, seed)
    mini_base.prepare_data(data, seed=seed)
    root = mini_base.base_root(cache, seed)
    if not (root / "tower" / "tower.json").exists():  # a full base's tower is used even by --quick
        root = mini_base.base_root(cache, seed, steps_scale=scale)
    mini_base.pretrain_tower(data, root / "tower", seed=seed, steps=max(2, int(round(mini_base.TOWER_STEPS * scale))),
                             quiet=True)
    return {"data": str(data), "images": str(data / "images"), "tower": str(root / "tower" / "tower.safetensors")}


def text_ppl(model_dir: Path, heldout: Path, out: Path) -> dict:
    """Held-out C perplexity of an exported model (`likelihood.text_perplexity`, windows of PPL_LEN); cached."""
    if out.exists():
        return json.loads(out.read_text())
    from vlmjax.eval.likelihood import text_perplexity
    from vlmjax.generate.loading import load_model

    model, _cfg, tok = load_model(model_dir)
    m = text_perplexity(model, tok, heldout, max_length=PPL_LEN, batch_size=16)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(m))
    return m


def unigram_reference(data: Path) -> float:
    """The add-one unigram model's held-out C perplexity, tokenised exactly as `text_ppl` tokenises."""
    from transformers import AutoTokenizer

    from vlmjax.eval.likelihood import read_texts

    tok = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    ids = lambda path: [tok(t, add_special_tokens=True)["input_ids"] for _, t in read_texts(path)]  # noqa: E731
    return mini_data.unigram_perplexity(ids(data / "corpus_train.jsonl"), ids(data / "corpus_heldout.jsonl"), len(tok))


def text_gate(ppl: float, unigram: float, ratio: float = GATE_RATIO) -> tuple[bool, str]:
    ok = ppl <= ratio * unigram
    return ok, (f"text LM gate: held-out C perplexity {ppl:.2f} vs unigram {unigram:.2f} (gate <= {ratio:g} x unigram)"
                f"  {'ok' if ok else 'FAIL - the LM has no text skill to lose; the arms below cannot show forgetting'}")


def forgetting_line(rows: dict) -> str:
    """Is forgetting present: does arm (b) (pairs, LLM unfrozen) raise held-out perplexity above the text LM's?"""
    lm, b = rows["text LM"]["perplexity"], rows.get("(b) pairs", {}).get("perplexity")
    if b is None:
        return "forgetting: arm (b) not run"
    if b > lm * 1.05:
        return f"forgetting present: arm (b) raises held-out C perplexity {lm:.2f} -> {b:.2f}"
    return (f"forgetting ABSENT: arm (b) leaves held-out C perplexity at {b:.2f} (text LM {lm:.2f}); the arms' text "
            "columns below do not show the paper's effect")


def run(root: Path, *, seed: int = 0, base_seed: int = 0, quick: bool = False, all_arms: bool = False, base: dict | None = None,
        base_cache: Path | None = None, over: dict | None = None, data_kw: dict | None = None,
        arms: tuple[str, ...] | None = None, steps_scale: float = 1.0) -> dict:
    """The slice's pipeline (module docstring). base: a `mini_base.build_base` dict to take the data and tower from
    (the test suite's tiny base; else the shared mini base of `base_seed`, one tower for every recipe seed); over: {stage or "all": {dotted: value}} per-stage overrides (tests shrink the model);
    data_kw: `mini_data.build` sizes; arms: which of ARMS (default a b d, + e with all_arms); steps_scale: every
    stage's steps scaled (a stage already exported is kept as it is)."""
    from vlmjax.eval import report

    started, cpu0 = time.time(), time.process_time()
    root = Path(root)
    over = over or {}
    scale = 0.02 if quick else steps_scale
    if base is not None:
        parts = {"data": base["data"], "images": base["images"],
                 "tower": str(Path(base["root"]) / "tower" / "tower.safetensors")}
    else:
        parts = base_parts(Path(base_cache or root.parent / "mini_base"), seed=base_seed, quick=quick)
    sizes = dict(n_easy=24, n_clipart=60, n_clipart_images=6, scan_limit=120, n_sft=24) if quick else {}
    data = root / "data"
    info = mini_data.build(data, easy_images=parts["images"], easy_captions=Path(parts["data"]) / "train_captions.jsonl",
                           seed=seed, **{**sizes, **(data_kw or {})})
    print(f"[1/7] data: {info}", flush=True)
    images, heldout = str(data / "images"), data / "corpus_heldout.jsonl"

    def stage(name: str, workdir: Path, source: str, extra: dict | None = None, **kw) -> Path:
        o = {"train.seed": seed, "model.seed": seed, **over.get("all", {}), **(extra or {}), **over.get(name, {})}
        return stages.train_stage(name, workdir, config_file=CONFIG, image_root=images, source=str(data / source),
                                  steps_scale=scale, over=o, quiet=True, **kw)

    lm = stage("text_lm", root / "text_lm", "text_lm.jsonl", tokenizer=str(data / "tokenizer"),
               load_params=parts["tower"])
    rows = {"text LM": text_ppl(lm, heldout, root / "results" / "ppl_text_lm.json")}
    unigram = unigram_reference(data)
    passed, gate = text_gate(rows["text LM"]["perplexity"], unigram)
    print(f"[2/7] {gate}", flush=True)
    align = stage("align", root / "align", "pairs.jsonl", model_path=str(lm))
    rows["align (LLM frozen)"] = text_ppl(align, heldout, root / "results" / "ppl_align.json")
    print(f"[3/7] align: held-out C perplexity {rows['align (LLM frozen)']['perplexity']:.2f}", flush=True)
    arms = arms or (("a", "b", "d", "e") if all_arms else ("a", "b", "d"))
    for arm in arms:
        name, what = ARMS[arm]
        extra = {}
        if name == "pretrain_mix":  # both sources: train_stage sets only the first one's paths
            srcs = stages.stage_config(CONFIG, name).data.sources
            extra = {"data.sources": tuple({**dict(s), "path": str(data / Path(s["path"]).name), "image_root": images}
                                           for s in srcs)}
        over.setdefault(name, {}).update(extra)
        export = stage(name, root / f"arm_{arm}", "docs.jsonl" if name == "pretrain_docs" else "pairs.jsonl",
                       model_path=str(align))
        rows[f"({arm}) {what}"] = text_ppl(export, heldout, root / "results" / f"ppl_arm_{arm}.json")
        print(f"[4/7] arm ({arm}) {what}: held-out C perplexity {rows[f'({arm}) {what}']['perplexity']:.2f}", flush=True)
    models = {"text LM": lm, "align (LLM frozen)": align,
              **{f"({a}) {ARMS[a][1]}": root / f"arm_{a}" / "export" for a in arms}}
    ev = dict(captions=Path(parts["data"]) / "train_captions.jsonl", fact_qa=data / "fact_qa.jsonl",
              n_caption=16 if quick else N_CAPTION, n_vqa=16 if quick else N_VQA)
    for label, model in models.items():
        rows[label].update(pretrained_metrics(model, root / "results" / _slug(label), with_captions=label != "text LM",
                                              **ev))
        print(f"[5/7] {label}: {_brief(rows[label])}", flush=True)
    for label, arm, extra in sft_variants(arms, all_arms, data, images):
        export = stage("sft", root / f"sft_{_slug(label)}", "sft.json",
                       model_path=str(models[f"({arm}) {ARMS[arm][1]}"]), extra=extra)
        rows[label] = {**text_ppl(export, heldout, root / "results" / f"ppl_sft_{_slug(label)}.json"),
                       **sft_metrics(export, root / "results" / _slug(label), **ev)}
        print(f"[6/7] {label}: {_brief(rows[label])}", flush=True)
    forgetting = forgetting_line(rows)
    table = ["| model | held-out C perplexity | fact QA | caption 0-shot | caption 4-shot | easy-vqa |",
             "|---|---|---|---|---|---|", f"| unigram (add-one, numpy) | {unigram:.2f} | - | - | - | - |"]
    fmt = lambda v, k, d=3: "-" if k not in v else f"{v[k]:.{d}f}"  # noqa: E731
    table += [f"| {k} | {v['perplexity']:.2f} | {fmt(v, 'fact_qa')} | {fmt(v, 'caption_0shot')} | "
              f"{fmt(v, 'caption_4shot')} | {fmt(v, 'accuracy')} |" for k, v in rows.items()]
    steps = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/stage.json"))}
    out = {"gate": {"passed": passed, "line": gate, "unigram_perplexity": unigram, "ratio": GATE_RATIO},
           "forgetting": forgetting, "rows": rows, "data": info, "table": "\n".join(table), "seed": seed,
           "root": str(root),
           "quick": quick, "stages": {k: {x: v.get(x) for x in ("steps", "seconds", "cpu_seconds", "loss_first",
                                                                  "loss_last")} for k, v in steps.items()},
           "seconds": round(time.time() - started, 1), "cpu_seconds": round(time.process_time() - cpu0, 1),
           "config": {"config_file": str(CONFIG), "over": over, "all": all_arms, "blend": BLEND}}
    report.write_results(root / "results" / "miniature.json", out, meta=report.run_meta(started))
    print(f"[7/7] {gate}\n{forgetting}\n" + "\n".join(table), flush=True)
    print(f"(held-out C: {info['corpus_heldout']} documents; {time.time() - started:.0f} s; "
          f"{root / 'results' / 'miniature.json'})", flush=True)
    return out


def _slug(label: str) -> str:
    """A row label as a folder name: "SFT after (d) + text blend" -> "sft_after_d_text_blend"."""
    return "_".join("".join(c if c.isalnum() else " " for c in label.lower()).split())


def _brief(row: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k in METRICS)


def pretrained_metrics(model: Path, out: Path, *, captions: Path, fact_qa: Path, n_caption: int, n_vqa: int,
                       with_captions: bool = True) -> dict:
    """A pre-trained (not SFT'd) model: fact-QA accuracy in the plain template, and 0-/4-shot caption accuracy
    (describe_both: colour and shape right; `mini_eval`)."""
    m = {"fact_qa": mini_eval.fact_accuracy(model, fact_qa, out / "fact_qa.json", template="plain")["accuracy"]}
    if with_captions:
        for k in (0, SHOTS):
            m[f"caption_{k}shot"] = mini_eval.caption_accuracy(model, out / f"caption_{k}shot.json", n=n_caption,
                                                               shots=k, captions=captions)["describe_both"]
    return m


def sft_metrics(model: Path, out: Path, *, captions: Path, fact_qa: Path, n_caption: int, n_vqa: int) -> dict:
    """An SFT'd model: fact-QA accuracy in the chat template, easy-vqa test accuracy by kind + describe_both."""
    v = mini_eval.vqa_by_kind(model, out / "easy_vqa.json", n=n_vqa)
    return {"fact_qa": mini_eval.fact_accuracy(model, fact_qa, out / "fact_qa.json", template=None)["accuracy"],
            **{k: v[k] for k in ("accuracy", "shape", "color", "yes/no", "describe_both") if k in v}}


def sft_variants(arms, all_arms: bool, data: Path, images: str) -> list[tuple[str, str, dict]]:
    """[(row label, the arm it starts from, extra overrides)]: SFT on easy-vqa QA after each arm; the LLM frozen
    throughout (arm (a), then SFT of the projector alone); arm (d) + the text-only blend (BLEND of the records are
    fact QA, `llava` text-only, via source `weight`); --all: arm (b) + the blend, and SFT after arm (e)."""
    blend = {"data.sources": (
        dict(format="llava", path=str(data / "sft.json"), image_root=images, weight=1.0 - BLEND),
        dict(format="llava", path=str(data / "fact_blend.json"), image_root=images, weight=BLEND))}
    out = [(f"SFT after ({a})", a, {}) for a in arms if a in ("a", "b", "d")]
    if "a" in arms:
        out.insert(1, ("LLM frozen throughout", "a", {"train.trainable": ("^projector/",)}))
    if "d" in arms:
        out.append(("SFT after (d) + text blend", "d", blend))
    if all_arms and "b" in arms:
        out.append(("SFT after (b) + text blend", "b", blend))
    if all_arms and "e" in arms:
        out.append(("SFT after (e)", "e", {}))
    return out


def run_seeds(root: Path, *, seeds=(0, 1, 2), figures: Path | None = None, **kw) -> dict:
    """`run` per seed in ROOT/seed{S} (data order, documents, every stage's init and batches; a seed done earlier is
    read back from its caches, so seeds may be run by separate invocations), then the report (`mini_report`): mean
    +- sd tables ('*' = differs from arm (b) / SFT after (b) by more than the seed spread, Welch), the paper's
    comparisons against the spread, figures (PNG, in `figures`, default ROOT/figures) and ROOT/results/miniature.json
    with run_meta."""
    from vlmjax.eval import report
    from vlmjax.recipes.vila import mini_report

    started, cpu0 = time.time(), time.process_time()
    runs = {s: run(Path(root) / f"seed{s}", seed=s, **kw) for s in seeds}
    per_seed = mini_report.per_seed_rows(runs)
    agg = report.aggregate(per_seed)
    t_pre, t_sft = mini_report.tables(agg)
    comps = mini_report.comparisons(agg)
    figs = mini_report.draw_figures(agg, runs, Path(figures or Path(root) / "figures"))
    gates = [r["gate"]["line"] for r in runs.values()]
    first = runs[seeds[0]]
    out = {"rows": {k: {m: st._asdict() for m, st in v.items()} for k, v in agg.items()}, "per_seed": per_seed,
           "gates": gates, "gates_passed": [r["gate"]["passed"] for r in runs.values()],
           "forgetting": [r["forgetting"] for r in runs.values()], "table": t_pre, "table_sft": t_sft,
           "comparisons": comps, "figures": figs, "seeds": list(seeds), "stages": first["stages"],
           "seed_seconds": {s: r["seconds"] for s, r in runs.items()},
           "seed_cpu_seconds": {s: r["cpu_seconds"] for s, r in runs.items()},
           "stage_cpu_seconds": {s: sum(v["cpu_seconds"] or 0 for v in r["stages"].values()) for s, r in runs.items()},
           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items() if k != "base"}}
    report.write_results(Path(root) / "results" / "miniature.json", out, meta=report.run_meta(started))
    print("\n".join(f"seed {s}: {g}" for s, g in zip(seeds, gates)))
    print("\n".join(f"seed {s}: {f}" for s, f in zip(seeds, out["forgetting"])))
    print(t_pre + "\n\n" + t_sft)
    print("\n".join(mini_report.comparison_lines(comps)))
    print("\n".join(f"figure: {p}" for p in figs.values()))
    print(f"(this invocation: {time.time() - started:.0f} s wall, {time.process_time() - cpu0:.0f} s CPU of this "
          f"process; stage CPU seconds per seed: {out['stage_cpu_seconds']})")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/vila_mini"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="recipe seeds (data order, documents, training), each in WORKDIR/seed{S}; mean +- sd table")
    ap.add_argument("--base-seed", type=int, default=0, help="the shared mini base's seed (its data and tower)")
    ap.add_argument("--quick", action="store_true", help="a few steps of everything on a small corpus (smoke run)")
    ap.add_argument("--all", action="store_true", help="also arm (e) = pairs + documents")
    ap.add_argument("--base-cache", type=Path, default=None,
                    help="the shared mini base's cache (its data and tower; default WORKDIR/../mini_base)")
    ap.add_argument("--figures", type=Path, default=None, help="PNG folder (default WORKDIR/figures)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="scale every stage's steps (configs/vila/mini.py STEPS); stages already exported are kept")
    args = ap.parse_args(argv)
    try:
        out = run_seeds(args.workdir, seeds=tuple(args.seeds), quick=args.quick, all_arms=args.all,
                        base_cache=args.base_cache, base_seed=args.base_seed, figures=args.figures,
                        steps_scale=args.steps_scale)
    except FileNotFoundError as e:
        if mini_data.OPENCLIPART_SVG in str(e):
            print(f"VILA miniature: {e}")
            return 2
        raise
    return 0 if all(out["gates_passed"]) else 1


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    raise SystemExit(main())
