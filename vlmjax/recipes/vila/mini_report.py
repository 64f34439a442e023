"""The VILA miniature's report over seeds (`vlmjax.eval.report`, `vlmjax.eval.plots`): mean +- sd tables for the
pre-trained models and the SFT'd ones, the paper's comparisons each tested against the seed spread (Welch), and the
figures. Used by `miniature.run_seeds`."""

from __future__ import annotations

from pathlib import Path

UNIGRAM = "unigram (add-one, numpy)"
PRE_METRICS = ("perplexity", "nll_per_token", "fact_qa", "caption_0shot", "caption_4shot")
SFT_METRICS = ("perplexity", "fact_qa", "accuracy", "shape", "color", "yes/no", "describe_both")
LABELS = {"perplexity": "held-out C ppl", "nll_per_token": "nll / token", "fact_qa": "fact QA (held-out half)",
          "caption_0shot": "caption 0-shot", "caption_4shot": "caption 4-shot", "accuracy": "easy-vqa",
          "describe_both": "describe colour+shape"}
# (row A, metric A, row B, metric B): does A differ from B by more than the seed spread?
COMPARISONS = (
    ("(b) pairs", "perplexity", "text LM", "perplexity"),
    ("(d) interleaved documents", "perplexity", "text LM", "perplexity"),
    ("(d) interleaved documents", "perplexity", "(b) pairs", "perplexity"),
    ("(e) pairs + documents", "perplexity", "(b) pairs", "perplexity"),
    ("(b) pairs", "fact_qa", "text LM", "fact_qa"),
    ("(d) interleaved documents", "fact_qa", "text LM", "fact_qa"),
    ("SFT after (b)", "perplexity", "text LM", "perplexity"),
    ("SFT after (d)", "perplexity", "SFT after (b)", "perplexity"),
    ("SFT after (d) + text blend", "perplexity", "SFT after (d)", "perplexity"),
    ("SFT after (d) + text blend", "fact_qa", "SFT after (d)", "fact_qa"),
    ("SFT after (b) + text blend", "fact_qa", "SFT after (b)", "fact_qa"),
    ("SFT after (d)", "fact_qa", "SFT after (b)", "fact_qa"),
    ("SFT after (d)", "accuracy", "SFT after (b)", "accuracy"),
    ("LLM frozen throughout", "accuracy", "SFT after (a)", "accuracy"),
    ("LLM frozen throughout", "describe_both", "SFT after (a)", "describe_both"),
)
SHOT_ROWS = ("align (LLM frozen)", "(a) pairs, LLM frozen", "(b) pairs", "(d) interleaved documents",
             "(e) pairs + documents")


def per_seed_rows(runs: dict) -> dict:
    """{row: [{metric: value} per seed]} in the first seed's row order, the unigram reference first."""
    first = next(iter(runs.values()))
    out = {UNIGRAM: [{"perplexity": r["gate"]["unigram_perplexity"]} for r in runs.values()]}
    for label in first["rows"]:
        out[label] = [{m: v for m, v in r["rows"][label].items() if m in PRE_METRICS + SFT_METRICS}
                      for r in runs.values()]
    return out


def comparisons(agg: dict, comps=None) -> list[dict]:
    """Each comparison whose rows exist: means, difference, Welch t / df / p, and whether it exceeds the spread
    (`report.exceeds_spread`; never with fewer than 2 seeds). Plus 4-shot vs 0-shot captioning per SHOT_ROWS row."""
    from vlmjax.eval import report

    comps = list(COMPARISONS if comps is None else comps)
    comps += [(r, "caption_4shot", r, "caption_0shot") for r in SHOT_ROWS]
    out = []
    for ra, ma, rb, mb in comps:
        a, b = agg.get(ra, {}).get(ma), agg.get(rb, {}).get(mb)
        if a is None or b is None:
            continue
        row = {"a": f"{ra} {ma}", "b": f"{rb} {mb}", "mean_a": a.mean, "mean_b": b.mean, "diff": a.mean - b.mean,
               "exceeds_spread": report.exceeds_spread(a, b)}
        if a.n >= 2 and b.n >= 2:
            row["t"], row["df"], row["p"] = report.welch(a, b)
        out.append(row)
    return out


def comparison_lines(comps: list[dict]) -> list[str]:
    lines = []
    for c in comps:
        test = (f"Welch p = {c['p']:.3g}" + (" -> exceeds the spread" if c["exceeds_spread"] else
                                              " -> within the spread")) if "p" in c else "1 seed: spread not measured"
        lines.append(f"{c['a']} {c['mean_a']:.3f} vs {c['b']} {c['mean_b']:.3f}: {c['diff']:+.3f} ({test})")
    return lines


def tables(agg: dict) -> tuple[str, str]:
    """(pre-trained models' table, baseline arm (b); SFT'd models' table, baseline SFT after (b))."""
    from vlmjax.eval import report

    sft = {k: v for k, v in agg.items() if k.startswith("SFT") or k == "LLM frozen throughout"}
    pre = {k: v for k, v in agg.items() if k not in sft}
    t_pre = report.markdown_table(pre, PRE_METRICS, baseline="(b) pairs" if "(b) pairs" in pre else None,
                                  labels=LABELS)
    t_sft = report.markdown_table(sft, SFT_METRICS, baseline="SFT after (b)" if "SFT after (b)" in sft else None,
                                  labels=LABELS) if sft else ""
    return t_pre, t_sft


def draw_figures(agg: dict, runs: dict, fig_dir: Path) -> dict:
    """PNGs: held-out perplexity and fact QA by model, 0- vs 4-shot captioning of the pre-trained models, easy-vqa
    after SFT (bars = mean, error bars = sd over seeds, '*' = beyond the spread vs arm (b) / SFT after (b)), and
    the first seed's stage loss curves."""
    from vlmjax.eval import plots

    fig_dir = Path(fig_dir)
    rows = {k: v for k, v in agg.items() if k != UNIGRAM}
    sft = {k: v for k, v in rows.items() if k.startswith("SFT") or k == "LLM frozen throughout"}
    shots = {k: v for k, v in rows.items() if k in SHOT_ROWS}
    b = lambda d, x: x if x in d else None  # noqa: E731
    out = {"perplexity": plots.bar_chart(rows, ["perplexity"], fig_dir / "perplexity.png", labels=LABELS,
                                         baseline=b(rows, "(b) pairs"), title="VILA miniature: held-out C perplexity"),
           "fact_qa": plots.bar_chart(rows, ["fact_qa"], fig_dir / "fact_qa.png", labels=LABELS,
                                      baseline=b(rows, "(b) pairs"),
                                      title="VILA miniature: fact QA (held-out half, option log-likelihood)")}
    if shots:
        out["shots"] = plots.bar_chart(shots, ["caption_0shot", "caption_4shot"], fig_dir / "shots.png",
                                       labels=LABELS, title="Pre-trained models: caption accuracy 0- vs 4-shot")
    if sft:
        out["sft"] = plots.bar_chart(sft, ["accuracy", "shape", "color", "yes/no", "describe_both"],
                                     fig_dir / "sft.png", labels=LABELS, baseline=b(sft, "SFT after (b)"),
                                     title="After SFT: easy-vqa test")
    seed0 = next(iter(runs.values()))
    root = Path(seed0["root"])
    curves = {p.parent.name: p for p in sorted(root.glob("*/metrics.jsonl"))}
    if curves:
        out["losses"] = plots.loss_curves(curves, fig_dir / "losses.png", logy=True,
                                          title=f"VILA miniature stage losses (seed {seed0['seed']})")
    return out
