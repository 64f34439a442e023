"""COINCIDE reproduced in miniature on offline easy-vqa: does budget allocation by cluster help when the instruction
data is redundant and imbalanced?

    python -m vlmjax.recipes.coincide.miniature [--workdir runs/coincide_mini] [--base-cache runs/mini_base]
        [--seeds 0 1 2] [--budgets 0.1 0.2] [--k 200] [--n-eval 2000] [--ablations] [--quick]

Pool: the single-turn easy-vqa train questions of images 0-1999 (19,210: 74% yes/no in 16 paraphrase templates,
13% colour, 13% shape). Target: the shared mini base (`vlmjax.recipes.mini_base`, aligned + SFT'd on images
3000-3999), then one epoch of SFT per arm (configs/coincide/mini.py:sft, token-bound packing). Reference: the same
base SFT'd for one epoch on the questions of images 3000-3499 (:reference); COINCIDE's features are its attention
outputs at every layer (`coincide.features`), clustered by spherical k-means (`coincide.kmeans`), budgets and MMD
prototypes by `coincide.select`. Arms per budget: random, COINCIDE, balanced-by-kind (the oracle: equal budget for
shape / colour / yes-no, random within) and, with --ablations, COINCIDE's own ablations; plus the full pool. Every
arm runs for each seed (selection seed = k-means seed = SFT seed). The report (`report_runs`) prints the gates
first (the base sees shape and colour above chance; COINCIDE's composition differs from random's), then per budget
a table of easy-vqa test accuracy by kind, macro over kinds (the headline), micro, SFT steps and wall-clock
including features + selection (mean +- sd, '*' = beyond the spread vs random), the composition and the clusters;
figures in WORKDIR/figures, everything in WORKDIR/results/miniature.json. Every step is skipped when its output
exists, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from vlmjax.eval.easy_vqa import KINDS, answer_kind, evaluate_by_kind
from vlmjax.recipes import mini_base
from vlmjax.recipes.coincide import features as F
from vlmjax.recipes.coincide import kmeans as K
from vlmjax.recipes.coincide import select as S
from vlmjax.train import stages

REPO = Path(__file__).resolve().parents[3]
CONFIG = REPO / "configs" / "coincide" / "mini.py"
POOL_IMAGES, REF_IMAGES = (0, 2000), (3000, 3500)
QUICK = {"pool": (0, 24), "ref": (3000, 3008), "n_eval": 12, "k": 6}
CHANCE_GATE = {"shape": 1 / 3, "color": 1 / 8}  # above chance: 3 shapes, 8 colours
ABLATIONS = ("random_in_cluster", "uniform_clusters", "density_only")
DESCRIBE = "Describe the image briefly."


# ----------------------------------------------------------------------------------------------------- data


def template(question: str) -> str:
    """The question with its colour and shape words replaced: "Is there a red shape?" -> "Is there a {color}
    shape?" (easy-vqa's paraphrase templates; "shape" itself is a word of the template)."""
    from vlmjax.data.easy_vqa import COLORS, SHAPES

    q = re.sub(r"\b(" + "|".join(COLORS) + r")\b", "{color}", question, flags=re.I)
    return re.sub(r"\b(" + "|".join(SHAPES) + r")\b", "{shape}", q, flags=re.I)


def single_turn(records: dict, images: tuple[int, int]) -> list[dict]:
    """Every question of easy-vqa train images [a, b) as its own LLaVA record (id train_N_qJ, J counting the
    image's questions), with its answer kind and template; the description turn is left out."""
    out = []
    for n in range(*images):
        sid = f"train_{n}"
        if sid not in records:
            raise KeyError(f"easy-vqa train.json has no record {sid} (images {images})")
        turns = records[sid]["conversations"]
        pairs = [(turns[i]["value"].replace("<image>", "").strip(), turns[i + 1]["value"])
                 for i in range(0, len(turns), 2)]
        for j, (q, a) in enumerate(p for p in pairs if p[0] != DESCRIBE):
            if len(a.split()) != 1:
                raise ValueError(f"{sid}: question {q!r} has a multi-word answer {a!r} (not an easy-vqa question)")
            out.append({"id": f"{sid}_q{j}", "image": records[sid]["image"], "kind": answer_kind(a),
                        "template": template(q), "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                                   {"from": "gpt", "value": a}]})
    return out


def prepare(work: Path, base: dict, pool_images, ref_images) -> tuple[list[dict], Path, Path]:
    """WORKDIR/data/{pool,reference}.json from the base's easy-vqa train.json; -> (pool records, paths)."""
    data = work / "data"
    pool_path, ref_path = data / "pool.json", data / "reference.json"
    if not pool_path.exists():
        records = {r["id"]: r for r in json.loads((Path(base["data"]) / "train.json").read_text())}
        data.mkdir(parents=True, exist_ok=True)
        for path, images in ((ref_path, ref_images), (pool_path, pool_images)):  # pool last: it marks done
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(single_turn(records, images)))
            tmp.replace(path)
    return json.loads(pool_path.read_text()), pool_path, ref_path


# ----------------------------------------------------------------------------------------------------- training


def packed_steps(lengths, *, rows: int, seq_len: int, max_images: int, seed: int) -> int:
    """Batches in one epoch of samples of these token lengths (one image each), packed by the trainer's own
    first-fit `BatchBuilder` in a seeded order (the loader's shuffle differs; lengths are alike, so +-1)."""
    from vlmjax.data.packing import BatchBuilder, BatchShape, Unit

    shape = BatchShape(rows=rows, seq_len=seq_len, max_images=max_images, image_size=1)
    builder, n = None, 0
    pixels = np.zeros((1, 1, 1, 3), np.uint8)
    for i in np.random.default_rng(seed).permutation(len(lengths)):
        unit = Unit(((np.zeros(int(lengths[i]), np.int32), np.zeros(int(lengths[i]), bool)),), pixels)
        if builder is None or not builder.add(unit):
            builder, n = BatchBuilder(shape), n + 1
            if not builder.add(unit):
                raise ValueError(f"a sample of {lengths[i]} tokens does not fit a row of {seq_len}")
    return n


def token_lengths(model_dir, records: list[dict]) -> dict[str, int]:
    """Training token length of each record (the trainer's TextProcessor, via the scoring Encoder)."""
    from vlmjax.generate.loading import load_model
    from vlmjax.generate.requests import Encoder

    _model, cfg, tok = load_model(model_dir)
    text = Encoder(tok, cfg).text
    out = {}
    for r in records:
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in r["conversations"]]
        out[r["id"]] = len(text.encode(msgs, [1]).ids)
    return out


def sft(stage: str, work: Path, *, model: str, images: str, source: Path, ids: list[str], lengths: dict,
        seed: int, quick: bool) -> dict:
    """One epoch of `stage` on `source`: train.steps = its packed batch count (+1: the loader's order may pack
    one batch more; the loop stops at the end of the data). -> the stage's stage.json + its export path."""
    c = stages.stage_config(CONFIG, stage)
    over = {"train.seed": seed, "model.seed": seed}
    rows = 2 if quick else c.data.batch_size
    if quick:
        over["data.batch_size"] = rows
    steps = packed_steps([lengths[i] for i in ids], rows=rows, seq_len=c.data.seq_len,
                         max_images=c.data.max_images, seed=seed) + 1
    export = stages.train_stage(stage, work, config_file=CONFIG, model_path=model, image_root=images,
                                source=str(source), over={**over, "train.steps": steps}, quiet=True)
    info = json.loads((work / "stage.json").read_text())
    return {**info, "steps_run": len(info.get("losses", [])), "export": str(export)}


# ----------------------------------------------------------------------------------------------------- selection


def reference_features(work: Path, base: dict, ref_path: Path, pool_path: Path, lengths: dict, quick: bool):
    """Reference SFT, capture of the pool at every layer, features. -> (ids, x, meta, cost {seconds, cpu})."""
    from vlmjax.generate import llava_requests
    from vlmjax.generate.loading import load_model

    feats, cost_path = work / "features", work / "features" / "cost.json"
    if not cost_path.exists():
        t0, c0 = time.time(), time.process_time()
        ref_ids = [r["id"] for r in json.loads(ref_path.read_text())]
        ref = sft("reference", work / "reference", model=base["model"], images=base["images"], source=ref_path,
                  ids=ref_ids, lengths=lengths, seed=0, quick=quick)
        model, cfg, tok = load_model(ref["export"])
        layers = tuple(range(cfg.llm.num_layers))
        F.capture(model, tok, llava_requests(pool_path, base["images"]), work / "capture", layers=layers,
                  model_name="coincide-mini-reference", batch_size=64, progress=False)
        F.build_features(work / "capture", feats)
        cost = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
                "reference_steps": ref["steps_run"], "layers": list(layers)}
        cost_path.write_text(json.dumps(cost))
    ids, x, meta = F.load_features(feats)
    return ids, x, meta, json.loads(cost_path.read_text())


def clusters_for(work: Path, x, ids, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    out = work / "clusters" / f"seed{seed}"
    if not (out / "kmeans.json").exists():
        t0, c0 = time.time(), time.process_time()
        r = K.spherical_kmeans(x, k, iters=50, seed=seed, out_dir=out)
        K.save_clusters(out, r, ids, {"k": k, "iters": 50, "seed": seed, "seconds": round(time.time() - t0, 1),
                                      "cpu_seconds": round(time.process_time() - c0, 1)})
    return K.load_clusters(out)


def balanced(kinds: list[str], target: int, seed: int) -> tuple[list[int], dict]:
    """The oracle: equal budget per answer kind (a kind with fewer samples passes the rest on, `select.allocate`),
    random within a kind."""
    names = sorted(set(kinds))
    idx = {k: np.flatnonzero(np.asarray(kinds) == k) for k in names}
    budget = S.allocate(np.full(len(names), 1 / len(names)), np.array([len(idx[k]) for k in names]), target)
    rng = np.random.default_rng(seed)
    picked = [int(i) for k, b in zip(names, budget) for i in rng.choice(idx[k], int(b), replace=False)]
    return sorted(picked), dict(zip(names, budget.tolist()))


def select_arm(method: str, work: Path, pool: list[dict], *, target: int, seed: int, feats=None, k: int = 0):
    """Row indices of `pool` for one arm, cached in WORKDIR/select/METHOD_T/seedS/selection.json with its cost
    (selection seconds; COINCIDE's also count k-means, and the report adds the features)."""
    out = work / "select" / f"{method}_{target}" / f"seed{seed}"
    path = out / "selection.json"
    if path.exists():
        return json.loads(path.read_text())
    info: dict = {"method": method, "target": target, "seed": seed}
    if method in S.CLUSTER_METHODS:  # k-means first: its own cost, shared by the budgets (kmeans.json)
        clusters = clusters_for(work, feats[1], feats[0], k, seed)
    t0, c0 = time.time(), time.process_time()
    if method == "random":
        picked = S.select_random(len(pool), target, seed)
    elif method == "balanced":
        picked, info["kind_budgets"] = balanced([r["kind"] for r in pool], target, seed)
    else:
        ids, x, meta = feats
        if ids != [r["id"] for r in pool]:
            raise ValueError(f"{work / 'features'}: feature rows are not the pool's samples in order "
                             "(a dropped or failed capture): rerun the features step")
        centroids, assign, kinfo = clusters
        r = S.select_clusters(x, assign, centroids, len(meta["layers"]), target, method=method, seed=seed)
        picked, info["clusters"] = r["picked"], cluster_table(r["clusters"], assign, pool)
        info["kmeans_seconds"], info["kmeans_cpu_seconds"] = kinfo["seconds"], kinfo["cpu_seconds"]
        info["purity"] = purity(assign, pool)
    info.update(seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1),
                picked=[int(i) for i in picked], composition=composition([pool[i]["kind"] for i in picked]))
    out.mkdir(parents=True, exist_ok=True)
    subset = [{k: v for k, v in pool[i].items() if k in ("id", "image", "conversations")} for i in picked]
    (out / "subset.json").write_text(json.dumps(subset))
    path.write_text(json.dumps(info))
    return info


def composition(kinds) -> dict[str, float]:
    kinds = list(kinds)
    return {k: sum(x == k for x in kinds) / max(len(kinds), 1) for k in KINDS}


def _majority(values) -> tuple[str, float]:
    names, counts = np.unique(np.asarray(values), return_counts=True)
    return str(names[counts.argmax()]), float(counts.max() / counts.sum())


def purity(assign: np.ndarray, pool: list[dict]) -> dict:
    """Size-weighted mean over clusters of the majority share of a template / an answer kind (1 = every cluster
    holds one template)."""
    out = {}
    for field in ("template", "kind"):
        values = np.asarray([r[field] for r in pool])
        tot = sum(_majority(values[assign == c])[1] * (assign == c).sum() for c in np.unique(assign))
        out[field] = float(tot / len(assign))
    return out


def cluster_table(clusters: list[dict], assign: np.ndarray, pool: list[dict]) -> list[dict]:
    """`select_clusters`' per-cluster rows + each cluster's majority kind and template (with their shares)."""
    kinds, tmpl = np.asarray([r["kind"] for r in pool]), np.asarray([r["template"] for r in pool])
    rows = []
    for c in clusters:
        members = assign == c["cluster"]
        if not members.any():
            continue
        (kind, kshare), (t, tshare) = _majority(kinds[members]), _majority(tmpl[members])
        rows.append({**c, "kind": kind, "kind_share": round(kshare, 3), "template": t,
                     "template_share": round(tshare, 3)})
    return sorted(rows, key=lambda r: -r["budget"])


# ----------------------------------------------------------------------------------------------------- pipeline


def arm_name(method: str, fraction: float | None) -> str:
    return "full" if fraction is None else f"{method} {fraction:.0%}"


def run(work: Path, *, seeds=(0, 1, 2), budgets=(0.1, 0.2), k: int = 200, n_eval: int = 2000,
        n_gate: int = 2000, ablations: bool = False, quick: bool = False, base_cache: Path = Path("runs/mini_base"),
        base: dict | None = None, base_seed: int = 0, full_seeds=None, base_sft_steps: int | None = None) -> dict:
    """Every arm for every seed (module docstring); -> {"base", "gate", "arms": {name: [per-seed dicts]}, ...}.
    n_gate: test questions of the base gate (with describing), n_eval: of every arm and the base row.
    full_seeds: the full-pool arm's seeds (default `seeds`). `base`: a `build_base`-style dict to use instead of
    the cache (tests). base_sft_steps: the target is the base with its SFT rerun for that many steps from its align
    export (`mini_base.sft_variant`, kept in WORKDIR/base_sft{N}): a base that still has something to learn."""
    t_start, c_start = time.time(), time.process_time()
    pool_images, ref_images = (QUICK["pool"], QUICK["ref"]) if quick else (POOL_IMAGES, REF_IMAGES)
    n_eval, n_gate, k = (QUICK["n_eval"], QUICK["n_eval"], min(k, QUICK["k"])) if quick else (n_eval, n_gate, k)
    work.mkdir(parents=True, exist_ok=True)
    base = base or mini_base.shared_base(base_cache, seed=base_seed, quick=quick)
    if base_sft_steps:
        base = mini_base.sft_variant(base, work / f"base_sft{base_sft_steps}", {"train.steps": base_sft_steps},
                                     seed=base_seed)
    cached = Path(base["root"]) / "results" / f"base_n{n_gate}.json"  # the base's own gate run, if made
    gate_res = evaluate_by_kind(base["model"], cached if cached.exists() else work / "results" / f"base_n{n_gate}.json",
                                n=n_gate)
    gate_ok, gate_lines = mini_base.base_gate(gate_res, CHANCE_GATE)
    gate_lines[0] = gate_lines[0].replace("mini base gate", "COINCIDE gate 1, the base sees shape and colour "
                                          "(above chance)")
    gate_lines += ["the mini base's own gate (for reference):"] + mini_base.base_gate(gate_res)[1][1:]
    print("\n".join(gate_lines), flush=True)

    pool, pool_path, ref_path = prepare(work, base, pool_images, ref_images)
    ref_recs = json.loads(ref_path.read_text())
    lengths_path = work / "data" / "lengths.json"
    if not lengths_path.exists():
        lengths_path.write_text(json.dumps(token_lengths(base["model"], pool + ref_recs)))
    lengths = json.loads(lengths_path.read_text())
    cluster_methods = ("coincide",) + (ABLATIONS if ablations else ())
    feats = reference_features(work, base, ref_path, pool_path, lengths, quick)
    feats, feat_cost = feats[:3], feats[3]
    print(f"reference + features: {feat_cost} ({len(pool)} pool samples, {feats[1].shape[1]} dims)", flush=True)

    plan = [(m, b) for b in budgets for m in ("random", "coincide", "balanced") + cluster_methods[1:]]
    plan.append(("full", None))  # last: the dearest arm
    selections = {}
    for method, frac in plan:
        if frac is not None:
            target = int(np.floor(frac * len(pool) + 0.5))
            selections[arm_name(method, frac)] = [select_arm(method, work, pool, target=target, seed=s, feats=feats,
                                                             k=k) for s in seeds]
    comp_lines = composition_gate(selections, budgets, composition([r["kind"] for r in pool]))
    print("\n".join(comp_lines), flush=True)

    arms = {}
    for method, frac in plan:
        name = arm_name(method, frac)
        arms[name] = []
        for i, s in enumerate(seeds if frac is not None or full_seeds is None else full_seeds):
            sel = selections[name][i] if frac is not None else None
            tag = "full" if sel is None else f"{method}_{sel['target']}"
            source = pool_path if sel is None else work / "select" / tag / f"seed{s}" / "subset.json"
            ids = [r["id"] for r in pool] if sel is None else [pool[j]["id"] for j in sel["picked"]]
            st = sft("sft", work / "arms" / tag / f"seed{s}", model=base["model"], images=base["images"],
                     source=source, ids=ids, lengths=lengths, seed=s, quick=quick)
            res = evaluate(st["export"], work / "arms" / tag / f"seed{s}" / f"eval_n{n_eval}.json", n=n_eval)
            select_s = 0.0 if sel is None else sel["seconds"] + sel.get("kmeans_seconds", 0.0)
            select_cpu = 0.0 if sel is None else sel["cpu_seconds"] + sel.get("kmeans_cpu_seconds", 0.0)
            if sel is not None and method in cluster_methods:
                select_s += feat_cost["seconds"]
                select_cpu += feat_cost["cpu_seconds"]
            arms[name].append({**metrics(res), "samples": len(ids), "steps": st["steps_run"],
                               "sft_s": st["seconds"], "select_s": round(select_s, 1),
                               "total_s": round(st["seconds"] + select_s, 1),
                               "total_cpu_s": round(st.get("cpu_seconds", 0.0) + select_cpu, 1)})
            print(f"  {name} seed {s}: {arms[name][-1]}", flush=True)
    base_res = evaluate(base["model"], work / "results" / f"base_eval_n{n_eval}.json", n=n_eval)
    return {"base": {**metrics(base_res), "model": base["model"]}, "base_results": base_res, "gate_results": gate_res,
            "gate": {"passed": gate_ok, "lines": gate_lines}, "composition_gate": comp_lines, "arms": arms,
            "selections": {n: [{k2: v for k2, v in s.items() if k2 != "picked"} for s in sel]
                           for n, sel in selections.items()},
            "pool": {"n": len(pool), "composition": composition([r["kind"] for r in pool]),
                     "templates": len({r["template"] for r in pool})},
            "features": feat_cost, "seconds": round(time.time() - t_start, 1),
            "cpu_seconds": round(time.process_time() - c_start, 1)}


def evaluate(model_dir, out: Path, *, n: int, batch_size: int = 128) -> dict:
    """easy-vqa test accuracy by kind on n questions (`accuracy_by_kind`, no describing), cached in `out`;
    batches of 128 questions (the tiny model's generation is per-step overhead on CPU: 16 is ~4x slower)."""
    from vlmjax.eval.easy_vqa import accuracy_by_kind
    from vlmjax.generate.loading import load_model

    if out.exists():
        return json.loads(out.read_text())
    model, _cfg, tok = load_model(model_dir)
    res = accuracy_by_kind(model, tok, n=n, describe=False, batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(res))
    out.with_suffix(".tmp").replace(out)
    return res


def metrics(res: dict) -> dict:
    """Accuracy by kind, macro over the kinds present (the headline: the pool is 74% yes/no) and micro."""
    kinds = {k: res[k] for k in KINDS if k in res}
    return {"macro": float(np.mean(list(kinds.values()))), "micro": res["accuracy"], **kinds}


def composition_gate(selections: dict, budgets, pool_comp: dict) -> list[str]:
    """Gate 2: does COINCIDE's composition by kind differ from random's (Welch over seeds, and by >= 2 points on
    some kind)? If not, the accuracy table cannot show the allocation's effect."""
    from vlmjax.eval import report

    lines = [f"pool composition: " + ", ".join(f"{k} {v:.3f}" for k, v in pool_comp.items())]
    for b in budgets:
        co, ra = selections[arm_name("coincide", b)], selections[arm_name("random", b)]
        diffs = []
        for kind in KINDS:
            a, r = [s["composition"][kind] for s in co], [s["composition"][kind] for s in ra]
            if abs(np.mean(a) - np.mean(r)) >= 0.02 and (len(a) < 2 or report.exceeds_spread(a, r)):
                diffs.append(kind)
        comp = ", ".join(f"{kind} {np.mean([s['composition'][kind] for s in co]):.3f} vs "
                         f"{np.mean([s['composition'][kind] for s in ra]):.3f}" for kind in KINDS)
        verdict = (f"differs ({', '.join(diffs)})" if diffs else
                   "does NOT differ: the table below cannot show an effect of the allocation")
        lines.append(f"COINCIDE gate 2 at {b:.0%}: composition COINCIDE vs random: {comp}: {verdict}")
    return lines


# ----------------------------------------------------------------------------------------------------- report

TABLE = ("macro", "micro", "shape", "color", "yes/no", "steps", "total_s")
LABELS = {"macro": "macro (headline)", "micro": "micro", "shape": "shape q.", "color": "colour q.",
          "yes/no": "yes/no q.", "steps": "SFT steps", "total_s": "wall s (SFT + features + selection)"}


def report_runs(work: Path, r: dict, *, budgets, started: float | None = None, figures: bool = True, **config) -> dict:
    """Gates, then per budget a mean +- sd table (base, full, the budget's arms; '*' = beyond the spread vs random
    at that budget), composition by kind vs the pool, the clusters' purity and budgets; figures; results JSON."""
    from vlmjax.eval import report

    agg = report.aggregate({"base (no further SFT)": [r["base"]], **r["arms"]})
    comp = report.aggregate({"pool": [r["pool"]["composition"]],
                             **{n: [s["composition"] for s in sel] for n, sel in r["selections"].items()}})
    tables, lines = {}, list(r["gate"]["lines"]) + list(r["composition_gate"])
    for b in budgets:
        rows = {n: a for n, a in agg.items() if n in ("base (no further SFT)", "full") or n.endswith(f" {b:.0%}")}
        tables[f"{b:.0%}"] = report.markdown_table(rows, TABLE, baseline=arm_name("random", b), labels=LABELS)
        lines += ["", f"budget {b:.0%} (easy-vqa test, n={r['base_results']['n']} questions):", tables[f"{b:.0%}"]]
    comp_table = report.markdown_table(comp, KINDS)
    lines += ["", "composition by answer kind (fraction of the selected samples):", comp_table]
    co = [n for n in r["selections"] if n.startswith("coincide")]
    if co:
        first = r["selections"][co[0]][0]
        lines += ["", f"clusters ({co[0]}, seed {first['seed']}): purity by template {first['purity']['template']:.3f}, "
                  f"by kind {first['purity']['kind']:.3f} ({r['pool']['templates']} templates); the largest budgets:"]
        lines += [f"  cluster {c['cluster']:>4}: size {c['size']:>4} budget {c['budget']:>4} P {c['P']:.3f} T {c['T']:.3f} "
                  f"D {c['D']:.3f}  {c['kind']} ({c['kind_share']:.0%}) {c['template']!r} ({c['template_share']:.0%})"
                  for c in first["clusters"][:8]]
        by_kind = {}
        for c in first["clusters"]:
            by_kind.setdefault(c["kind"], [0, 0])
            by_kind[c["kind"]][0] += c["size"]
            by_kind[c["kind"]][1] += c["budget"]
        lines.append("  budget vs size by the clusters' majority kind: " + ", ".join(
            f"{kd} {bs[1]}/{bs[0]} ({bs[1] / max(bs[0], 1):.1%})" for kd, bs in sorted(by_kind.items())))
    out = {"tables": tables, "composition_table": comp_table, "rows": agg, "composition": comp, **r,
           "config": {"budgets": list(budgets), **{k: str(v) if isinstance(v, Path) else v for k, v in config.items()}}}
    if figures:
        from vlmjax.eval import plots

        fig = work / "figures"
        out["figures"] = {f"accuracy_{b:.0%}": plots.bar_chart(
            {n: a for n, a in agg.items() if n == "full" or n.endswith(f" {b:.0%}")}, ("shape", "color", "yes/no", "macro"),
            fig / f"accuracy_{int(round(b * 100))}.png", baseline=arm_name("random", b), labels=LABELS,
            title=f"COINCIDE miniature, budget {b:.0%} (easy-vqa test)") for b in budgets}
        out["figures"]["composition"] = plots.bar_chart(comp, KINDS, fig / "composition.png",
                                                        title="composition of the selections by answer kind")
        lines += [f"figure: {p}" for p in out["figures"].values()]
    meta = report.run_meta(started, wall_s_pipeline=r["seconds"], cpu_s_pipeline=r["cpu_seconds"])
    report.write_results(work / "results" / "miniature.json", out, meta=meta)
    print("\n".join(lines), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("runs/coincide_mini"))
    ap.add_argument("--base-cache", type=Path, default=Path("runs/mini_base"),
                    help="the shared mini base's cache folder (built there if missing)")
    ap.add_argument("--base-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="selection / k-means / SFT seeds; each row is mean +- sd over them")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--k", type=int, default=200, help="k-means clusters (paper: 10,000 for 665k samples)")
    ap.add_argument("--n-eval", type=int, default=2000, help="test questions per arm (and the base row)")
    ap.add_argument("--n-gate", type=int, default=2000, help="test questions of the base gate")
    ap.add_argument("--full-seeds", type=int, nargs="+", default=None, help="the full-pool arm's seeds "
                    "(default --seeds)")
    ap.add_argument("--base-sft-steps", type=int, default=None, help="rerun the base's SFT for N steps from its "
                    "align export first and use that as the target (250: the study's weaker base)")
    ap.add_argument("--ablations", action="store_true", help="also " + ", ".join(ABLATIONS))
    ap.add_argument("--quick", action="store_true", help="a few images, steps and questions (CI smoke run)")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    started = time.time()
    kw = dict(seeds=tuple(a.seeds), budgets=tuple(a.budgets), k=a.k, n_eval=a.n_eval, n_gate=a.n_gate,
              ablations=a.ablations, quick=a.quick, base_cache=a.base_cache, base_seed=a.base_seed,
              full_seeds=None if a.full_seeds is None else tuple(a.full_seeds), base_sft_steps=a.base_sft_steps)
    r = run(a.workdir, **kw)
    report_runs(a.workdir, r, started=started, figures=not a.no_figures, **kw)
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    raise SystemExit(main())
