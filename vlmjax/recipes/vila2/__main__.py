"""VILA^2 command line: recaption and combine one round (see the package docstring).

    python -m vlmjax.recipes.vila2 recaption --model M --data CAPTIONS --image-root R --round K --out DIR
    python -m vlmjax.recipes.vila2 combine --data CAPTIONS --round K --out DIR [--mode concat|replace|original]
    python -m vlmjax.recipes.vila2 loop --rounds N --config CONFIG --stages S1 S2 .. --caption-stages S \
        --captions CAPTIONS --image-root R --source STAGE=PATH .. --out DIR [--set STAGE:KEY=VALUE ..]

recaption: --shard-index / --shard-count run one host's share as a separate job (default: this jax process of
all); combine merges the shards and checks that every id is there once. Prints the counts as one JSON line.
loop: rounds 0..N of `vila2.loop.run_loop` (train every stage from scratch, recaption with the last round's model,
combine, evaluate on easy-vqa by kind), resumable from DIR/state.json; prints the summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from vlmjax.generate import cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.recipes.vila2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recaption", help="round K's recaptions of every caption record's image")
    r.add_argument("--model", required=True, help="VILA^K: a model folder, read by generate.load_model")
    r.add_argument("--model-name", default=None, help="name recorded as the recaptioning model (default: --model)")
    r.add_argument("--image-root", default=None, help="image folder, .tar shard or quoted glob of shards")
    r.add_argument("--batch-size", type=cli.positive_int, default=16)
    r.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    r.add_argument("--temperature", type=cli.non_negative_float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed (each image's stream also depends on its id)")
    r.add_argument("--shard-index", type=cli.non_negative_int, default=None)
    r.add_argument("--shard-count", type=cli.positive_int, default=None)
    lp = sub.add_parser("loop", help="rounds 0..N: train from scratch, recaption, combine, evaluate (resumable)")
    lp.add_argument("--rounds", type=cli.non_negative_int, required=True)
    lp.add_argument("--config", required=True, help="per-stage config file (get_config(stage))")
    lp.add_argument("--stages", nargs="+", required=True, help="stage names in order; each starts from the previous")
    lp.add_argument("--caption-stages", nargs="+", required=True, help="the stages trained on the round's captions")
    lp.add_argument("--captions", required=True, help="caption-format pairs to recaption (.json / .jsonl)")
    lp.add_argument("--image-root", required=True)
    lp.add_argument("--source", action="append", default=[], metavar="STAGE=PATH", help="another stage's data")
    lp.add_argument("--source-root", action="append", default=[], metavar="STAGE=DIR",
                    help="that stage's image root (default: its config's)")
    lp.add_argument("--out", required=True)
    lp.add_argument("--model-path", default=None, help="the first stage's starting model (model.path)")
    lp.add_argument("--tokenizer", default=None, help="the first stage's tokenizer (a from-scratch model)")
    lp.add_argument("--load-params", default=None, help="the first stage's extra weights (e.g. a pretrained tower)")
    lp.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                    help="a dotted config override of one stage (STAGE 'all': every stage); VALUE a Python literal")
    lp.add_argument("--mode", default="concat", choices=["concat", "replace"])
    lp.add_argument("--recaption-stage", default=None, help="whose export recaptions (default: the last stage)")
    lp.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    lp.add_argument("--temperature", type=cli.non_negative_float, default=0.7, help="recaptions are sampled")
    lp.add_argument("--slots", type=cli.non_negative_int, default=64, help="continuous batching slots (0: batches)")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--n-eval", type=cli.positive_int, default=500, help="easy-vqa test questions per round")
    lp.add_argument("--min-gain", type=float, default=None, help="stop when the eval average gains less")
    lp.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N caption records")
    c = sub.add_parser("combine", help="round K's training captions: original + recaption")
    c.add_argument("--mode", default="concat", choices=["concat", "replace", "original"])
    for q in (r, c):
        q.add_argument("--data", required=True, help="caption-format records (.json / .jsonl)")
        q.add_argument("--round", type=cli.non_negative_int, required=True)
        q.add_argument("--out", required=True, help="the run's folder (state.json, recaptions, combined captions)")
        q.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N records")
    return p


def main(argv=None) -> dict:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from vlmjax.data.pipeline import SourceSpec

    if args.cmd != "loop":
        cli.require_paths(p, data=(args.data, "file"))
    if args.cmd == "loop":
        out = run_loop_cli(p, args)
    elif args.cmd == "combine":
        from vlmjax.recipes.vila2.combine import combine

        out = combine(SourceSpec(format="caption", path=args.data), args.out, args.round, mode=args.mode,
                      limit=args.limit)
        out = {k: v for k, v in out.items() if k != "bad_records"}
    else:
        cli.require_paths(p, model=(args.model, "dir"))
        from vlmjax.generate import GenerationConfig, SamplingConfig, default_eos_ids, load_model
        from vlmjax.recipes.vila2.recaption import recaption
        from vlmjax.recipes.vila2.state import RunState

        name = args.model_name or os.path.normpath(args.model)
        RunState(args.out).start(args.round, name)  # another model's round fails here, before loading weights
        model, cfg, tok = load_model(args.model)
        config = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=SamplingConfig(args.temperature),
                                  eos_token_ids=default_eos_ids(tok, cfg), seed=args.seed)
        spec = SourceSpec(format="caption", path=args.data, image_root=args.image_root)
        out = recaption(model, tok, spec, args.out, args.round, name, config, batch_size=args.batch_size,
                        shard_index=args.shard_index, shard_count=args.shard_count, limit=args.limit)
    print(json.dumps(out))
    return out


def _pairs(p, items, sep, what):
    out = []
    for item in items:
        left, eq, right = item.partition(sep)
        if not eq or not left or not right:
            p.error(f"{what}: expected {what.split()[-1]}, got {item!r}")
        out.append((left, right))
    return out


def _literal(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def run_loop_cli(p, args) -> dict:
    from vlmjax.eval.easy_vqa import evaluate_by_kind
    from vlmjax.generate import GenerationConfig, SamplingConfig
    from vlmjax.recipes.vila2.loop import LoopSpec, run_loop

    cli.require_paths(p, captions=(args.captions, "file"), config=(args.config, "file"))
    over: dict = {}
    for stage, kv in _pairs(p, args.set, ":", "--set STAGE:KEY=VALUE"):
        key, eq, value = kv.partition("=")
        if not eq:
            p.error(f"--set {stage}:{kv}: expected KEY=VALUE")
        over.setdefault(stage, {})[key] = _literal(value)
    roots = dict(_pairs(p, args.source_root, "=", "--source-root STAGE=DIR"))
    sources = {stage: {"path": path, "image_root": roots.get(stage)}
               for stage, path in _pairs(p, args.source, "=", "--source STAGE=PATH")}
    first = {k: v for k, v in (("model_path", args.model_path), ("tokenizer", args.tokenizer),
                               ("load_params", args.load_params)) if v is not None}
    try:
        spec = LoopSpec(config_file=args.config, stages=tuple(args.stages), captions=args.captions,
                        image_root=args.image_root, caption_stages=tuple(args.caption_stages),
                        sources=sources, first=first, over=over,
                        mode=args.mode, recaption_stage=args.recaption_stage, limit=args.limit,
                        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, slots=args.slots,
                                                    sampling=SamplingConfig(args.temperature), seed=args.seed),
                        eval_fn=lambda model, out: evaluate_by_kind(model, out, n=args.n_eval),
                        average=("accuracy", "describe_both"))
    except ValueError as e:
        p.error(str(e))
    summary = run_loop(spec, args.out, args.rounds, min_gain=args.min_gain)
    return {"last": summary["last"], "stopped": summary["stopped"],
            "average": {k: (e.get("eval") or {}).get("average") for k, e in summary["rounds"].items()}}


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    main()
