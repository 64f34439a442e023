"""COINCIDE command line: features -> kmeans -> select (the capture is `features.capture`, a library call).

    python -m vlmjax.recipes.coincide features --capture CAPTURE_DIR --out FEATS [--model NAME --layers 3 7 ...]
    python -m vlmjax.recipes.coincide kmeans --features FEATS --out CLUSTERS --k 10000 --iters 50 --seed 1234
    python -m vlmjax.recipes.coincide select --data llava.json --features FEATS --clusters CLUSTERS --out SEL \\
        --fraction 0.2 [--method coincide|transfer_only|density_only|uniform_clusters|random_in_cluster|random|
                        stratified --label-field F|ppl_low --scores ppl.jsonl]
--config configs/coincide/llava15_7b.py fills the flags not given (model, layers, k, iters, seed, tau, fraction)
from the config's `coincide` block.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from vlmjax.recipes.coincide import features as F
from vlmjax.recipes.coincide import kmeans as K
from vlmjax.recipes.coincide import select as S


def _expect(a) -> dict:
    return {k: v for k, v in (("model", a.model), ("layers", a.layers)) if v is not None}


def cmd_features(a) -> dict:
    return F.build_features(a.capture, a.out, expect=_expect(a))


def cmd_kmeans(a) -> dict:
    ids, x, meta = F.load_features(a.features, expect=_expect(a))
    r = K.spherical_kmeans(x, a.k, iters=a.iters, seed=a.seed, backend=a.backend, out_dir=a.out)
    K.save_clusters(a.out, r, ids, {"k": a.k, "iters": a.iters, "seed": a.seed, "backend": a.backend,
                                    "features": os.path.abspath(a.features), "model": meta.get("model"),
                                    "ids_sha1": _ids_sha1(ids)})
    return {"k": a.k, "objective": r["objective"][-1], "empty": r["empty"], "max_centroid_cos": r["max_centroid_cos"]}


def _ids_sha1(ids) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(list(ids)).encode()).hexdigest()


def _target(a, n: int) -> int:
    t = a.target if a.target is not None else int(np.floor(a.fraction * n + 0.5))
    if t > n:
        raise ValueError(f"budget {t} > N={n} samples")
    return t


def cmd_select(a) -> dict:
    from vlmjax.generate import llava_requests, sample_keys
    from vlmjax.generate.requests import read_records

    records = read_records(a.data)
    keys = sample_keys(llava_requests(a.data))
    info = {"method": a.method, "data": os.path.abspath(a.data), "seed": a.seed}
    per_row, meta = {}, {}
    if a.features:
        pool, x, meta = F.load_features(a.features, expect=_expect(a))
        info["capture_errors"] = meta.get("capture_errors", 0)
        info["text_only"] = meta.get("text_only", 0)
        info["feature_dropped"] = len(meta.get("dropped", {}))
    elif a.method in S.CLUSTER_METHODS:
        raise ValueError(f"--method {a.method} needs --features and --clusters")
    else:
        pool = keys
    known = set(keys)
    stray = [k for k in pool if k not in known]
    if stray:
        raise KeyError(f"{a.features}: {len(stray)} feature ids are not samples of {a.data} (first {stray[:3]})")
    target = _target(a, len(pool))
    info.update(pool=len(pool), target=target)
    if a.method in S.CLUSTER_METHODS:
        if not a.clusters:
            raise ValueError(f"--method {a.method} needs --clusters")
        centroids, assign, kinfo = K.load_clusters(a.clusters)
        if kinfo["n"] != len(pool) or kinfo.get("ids_sha1") != _ids_sha1(pool):
            raise ValueError(f"{a.clusters} clustered other rows ({kinfo['n']} from {kinfo.get('features')}) than "
                             f"{a.features} holds ({len(pool)}): rerun kmeans on these features")
        r = S.select_clusters(x, assign, centroids, len(meta["layers"]), target, method=a.method, tau=a.tau,
                              seed=a.seed)
        picked, info["tau"], info["clusters"] = r["picked"], a.tau, r["clusters"]
        c = r["clusters"]
        per_row = {i: {"cluster": int(assign[i]), "T": c[assign[i]]["T"], "D": c[assign[i]]["D"],
                       "budget": c[assign[i]]["budget"]} for i in picked}
    elif a.method == "random":
        picked = S.select_random(len(pool), target, a.seed)
    elif a.method == "stratified":
        if not a.label_field:
            raise ValueError("--method stratified needs --label-field")
        by_key = dict(zip(keys, records))
        bad = [k for k in pool if a.label_field not in by_key[k]]
        if bad:
            raise KeyError(f"{a.data}: samples {bad[:5]} have no field {a.label_field!r}")
        labels = [by_key[k][a.label_field] for k in pool]
        picked, info["label_budgets"] = S.select_stratified(labels, target, a.seed)
        per_row = {i: {"label": labels[i]} for i in picked}
    elif a.method == "ppl_low":
        if not a.scores:
            raise ValueError("--method ppl_low needs --scores (a score_dataset JSONL)")
        picked = S.select_ppl_low(pool, a.scores, target)
    else:
        raise ValueError(f"--method {a.method!r}: use one of {S.METHODS}")
    subset = a.subset_name or os.path.basename(a.data)
    body = S.write_outputs(a.out, records, keys, pool, picked, info, per_row, subset_name=subset)
    return {"method": a.method, "selected": body["selected_count"], "pool": len(pool),
            "subset": os.path.join(a.out, subset)}


DEFAULTS = {"k": None, "iters": 50, "seed": 1234, "tau": 0.1, "fraction": None}


def _fill(a) -> None:
    """Flags not given: from --config's `coincide` block, else DEFAULTS; kmeans needs K, select a size."""
    block = {}
    if a.config:
        from vlmjax.train.config_io import load_module

        cfg = load_module(a.config).get_config()
        if "coincide" not in cfg:
            raise ValueError(f"{a.config} has no `coincide` block")
        block = cfg.coincide.to_dict()
    for name in ("model", "layers") + tuple(DEFAULTS):
        if hasattr(a, name) and getattr(a, name) is None:
            value = block.get(name, DEFAULTS.get(name))
            setattr(a, name, list(value) if name == "layers" and value is not None else value)
    if a.cmd == "kmeans" and a.k is None:
        raise SystemExit("kmeans: give --k (or --config)")
    if a.cmd == "select" and a.fraction is None and a.target is None:
        raise SystemExit("select: give --fraction or --target (or --config)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vlmjax.recipes.coincide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("features", "kmeans", "select"):
        s = sub.add_parser(name)
        s.add_argument("--out", required=True)
        s.add_argument("--model", help="expected reference model name (checked against the capture)")
        s.add_argument("--layers", type=int, nargs="+", help="expected captured layers")
        s.add_argument("--config", help="a config file with a `coincide` block (configs/coincide/llava15_7b.py)")
        if name == "features":
            s.add_argument("--capture", required=True)
        else:
            s.add_argument("--features", required=(name == "kmeans"))
            s.add_argument("--seed", type=int)
        if name == "kmeans":
            s.add_argument("--k", type=int)
            s.add_argument("--iters", type=int)
            s.add_argument("--backend", default="jax", choices=("jax", "faiss"))
        if name == "select":
            s.add_argument("--data", required=True, help="the original LLaVA-format JSON")
            s.add_argument("--clusters")
            s.add_argument("--method", default="coincide", choices=S.METHODS)
            g = s.add_mutually_exclusive_group()
            g.add_argument("--fraction", type=float)
            g.add_argument("--target", type=int)
            s.add_argument("--tau", type=float)
            s.add_argument("--label-field")
            s.add_argument("--scores")
            s.add_argument("--subset-name", help="subset file name (default: the data file's name)")
    a = p.parse_args(argv)
    _fill(a)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = {"features": cmd_features, "kmeans": cmd_kmeans, "select": cmd_select}[a.cmd](a)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
