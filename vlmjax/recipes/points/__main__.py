"""POINTS command line: perplexity filtering of caption pairs.

    python -m vlmjax.recipes.points filter score --data caps.jsonl --images imgs --out runs/points/ppl.jsonl \\
        [--model SCORER_DIR --scorer-name NAME --template auto --batch-size 16 --shard-index I --shard-count N]
    python -m vlmjax.recipes.points filter select --ppl runs/points/ppl.jsonl --data caps.jsonl --images imgs \\
        --out runs/points/filter [--fraction 0.2 --scorer NAME]

`--data`: caption records (.json/.jsonl, the `caption` format: id, image, caption). `score` writes this host's
shard (`ppl-i-of-n.jsonl` with --shard-count > 1, default the jax processes); `select` merges the shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from vlmjax.recipes.points import filter as PF


def _spec(a):
    from vlmjax.data.pipeline import SourceSpec

    return SourceSpec(format="caption", path=a.data, image_root=a.images)


def cmd_score(a) -> dict:
    from vlmjax.generate import load_model

    model, _, tok = load_model(a.model)
    st = PF.score(model, tok, _spec(a), a.out, scorer=a.scorer_name or a.model, prompt=a.prompt,
                  template=a.template, batch_size=a.batch_size, shard_index=a.shard_index,
                  shard_count=a.shard_count, progress=a.progress)
    return {k: st[k] for k in ("pool", "requests", "written", "failed", "skipped_done", "out", "header")}


def cmd_select(a) -> dict:
    rep = PF.select(a.ppl, _spec(a), a.out, fraction=a.fraction, expect={"scorer": a.scorer})
    print("\n".join(rep["histogram"]), file=sys.stderr)
    return {k: rep[k] for k in ("scored", "failed", "non_finite_ppl", "kept", "cut")}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.recipes.points")
    top = p.add_subparsers(dest="part", required=True)
    f = top.add_parser("filter").add_subparsers(dest="cmd", required=True)
    s = f.add_parser("score", help="PPL of every caption given its image, this host's shard")
    s.add_argument("--model", default=PF.DEFAULT_SCORER,
                   help="HF LLaVA folder (default: the LLaVA-1.5-7B substitute for the paper's Qwen2-VL-7B)")
    s.add_argument("--scorer-name", default=None, help="name in the ppl header (default: --model)")
    s.add_argument("--prompt", default=PF.PROMPT)
    s.add_argument("--template", default="auto", help="the scorer's own chat template (default: its tokenizer's)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--shard-index", type=int, default=None)
    s.add_argument("--shard-count", type=int, default=None)
    s.add_argument("--no-progress", dest="progress", action="store_false")
    t = f.add_parser("select", help="merge shards, keep the lowest-PPL fraction, write the report")
    t.add_argument("--ppl", required=True, help="ppl.jsonl (or the stem of its host shards)")
    t.add_argument("--fraction", type=float, default=0.2)
    t.add_argument("--scorer", default=None, help="refuse ppl files from another scorer")
    for q in (s, t):
        q.add_argument("--data", required=True)
        q.add_argument("--images", default=None)
        q.add_argument("--out", required=True)
    return p


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    return {"score": cmd_score, "select": cmd_select}[a.cmd](a)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(main()))
