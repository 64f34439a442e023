"""VILA^2 command line: recaption and combine one round, run the loop, and the specialists (package docstring).

    python -m vlmjax.recipes.vila2 recaption --model M --data CAPTIONS --image-root R --round K --out DIR
    python -m vlmjax.recipes.vila2 combine --data CAPTIONS --round K --out DIR [--mode concat|replace|original]
    python -m vlmjax.recipes.vila2 loop --rounds N --config CONFIG --stages S1 S2 .. --caption-stages S \
        --captions CAPTIONS --image-root R --source STAGE=PATH .. --out DIR [--set STAGE:KEY=VALUE ..]
    python -m vlmjax.recipes.vila2 specialist train --config CONFIG --model VILA_K --data DOMAIN.json \
        --image-root R --workdir W [--epochs 1] [--set KEY=VALUE ..]
    python -m vlmjax.recipes.vila2 specialist recaption --model SPECIALIST --name NAME [--prompt P ..] \
        --data ROUND_CAPTIONS --image-root R --round K --out DIR
    python -m vlmjax.recipes.vila2 append --data ROUND_CAPTIONS --round K --out DIR --specialists NAME ..
    python -m vlmjax.recipes.vila2 subset --data PAIRS --fraction 0.05 --out SUBSET --rest REST

recaption (and specialist recaption): --shard-index / --shard-count run one host's share as a separate job
(default: this jax process of all); combine and append merge the shards and check that every id is there once.
Each command prints its counts as one JSON line. loop: rounds 0..N of `vila2.loop.run_loop` (train every stage
from scratch, recaption with the last round's model, combine, evaluate on easy-vqa by kind), resumable from
DIR/state.json; the config's RECAPTION dict (if any) gives the recaption prompts and defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from vlmjax.generate import cli


def _generation_args(q) -> None:
    q.add_argument("--model", required=True, help="a model folder, read by generate.load_model")
    q.add_argument("--model-name", default=None, help="name recorded as the recaptioning model (default: --model)")
    q.add_argument("--image-root", default=None, help="image folder, .tar shard or quoted glob of shards")
    q.add_argument("--batch-size", type=cli.positive_int, default=16)
    q.add_argument("--max-new-tokens", type=cli.positive_int, default=128)
    q.add_argument("--temperature", type=cli.non_negative_float, default=0.0, help="0 = greedy (default)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed (each image's stream also depends on its id)")
    q.add_argument("--shard-index", type=cli.non_negative_int, default=None)
    q.add_argument("--shard-count", type=cli.positive_int, default=None)


def _round_args(q) -> None:
    q.add_argument("--data", required=True, help="caption-format records (.json / .jsonl)")
    q.add_argument("--round", type=cli.non_negative_int, required=True)
    q.add_argument("--out", required=True, help="the run's folder (state.json, recaptions, combined captions)")
    q.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N records")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.recipes.vila2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("recaption", help="round K's recaptions of every caption record's image")
    _generation_args(r)
    lp = sub.add_parser("loop", help="rounds 0..N: train from scratch, recaption, combine, evaluate (resumable)")
    lp.add_argument("--rounds", type=cli.non_negative_int, required=True)
    lp.add_argument("--config", required=True, help="per-stage config file (get_config(stage))")
    lp.add_argument("--stages", nargs="+", required=True, help="stage names in order; each starts from the previous")
    lp.add_argument("--caption-stages", nargs="+", required=True, help="the stages trained on the round's captions")
    lp.add_argument("--captions", required=True, help="caption-format pairs to recaption (.json / .jsonl)")
    lp.add_argument("--caption-format", default="caption", choices=["caption", "caption_qa"],
                    help="caption_qa: the captions carry specialist QA turns (append's output)")
    lp.add_argument("--caption-source", default=None,
                    help="the name of the caption source the captions replace, in a mixture with several")
    lp.add_argument("--chat-template", default=None, help="caption_qa turns' template (default: the last stage's)")
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
    lp.add_argument("--mode", default=None, choices=["concat", "replace"], help="default: RECAPTION's, or concat")
    lp.add_argument("--recaption-stage", default=None, help="whose export recaptions (default: the last stage)")
    lp.add_argument("--max-new-tokens", type=cli.positive_int, default=None, help="default: RECAPTION's, or 128")
    lp.add_argument("--temperature", type=cli.non_negative_float, default=None,
                    help="recaptions are sampled (default: RECAPTION's, or 0.7)")
    lp.add_argument("--slots", type=cli.non_negative_int, default=64, help="continuous batching slots (0: batches)")
    lp.add_argument("--seed", type=int, default=0)
    lp.add_argument("--n-eval", type=cli.positive_int, default=500, help="easy-vqa test questions per round")
    lp.add_argument("--min-gain", type=float, default=None, help="stop when the eval average gains less")
    lp.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N caption records")
    c = sub.add_parser("combine", help="round K's training captions: original + recaption")
    c.add_argument("--mode", default="concat", choices=["concat", "replace", "original"])
    for q in (r, c):
        _round_args(q)
    sp = sub.add_parser("specialist", help="train a specialist, or have it answer its domain prompt per image")
    ssub = sp.add_subparsers(dest="action", required=True)
    st = ssub.add_parser("train", help="fine-tune VILA^k on domain data (llava format) with a stage config")
    st.add_argument("--config", required=True, help="per-stage config file with the specialist stage")
    st.add_argument("--stage", default="specialist")
    st.add_argument("--model", required=True, help="VILA^k: the export folder it starts from")
    st.add_argument("--data", required=True, help="the domain data (llava format)")
    st.add_argument("--image-root", required=True)
    st.add_argument("--workdir", required=True, help="the stage's folder (checkpoints, WORKDIR/export)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a dotted config override")
    st.add_argument("--steps-scale", type=float, default=1.0)
    st.add_argument("--epochs", type=float, default=None, help="steps = epochs over the domain file (not the config's)")
    sr = ssub.add_parser("recaption", help="the specialist answers its domain prompt about every image")
    _generation_args(sr)
    sr.add_argument("--name", required=True, help="the specialist (spatial, grounding, ocr or your own): its folder")
    sr.add_argument("--prompt", action="append", default=[], help="its prompt (repeat: one per image, seeded); "
                    "default: the domain's in vila2/prompts.py")
    _round_args(sr)
    ap = sub.add_parser("append", help="the round's captions + one QA turn per specialist (caption_qa records)")
    _round_args(ap)
    ap.add_argument("--specialists", nargs="+", required=True, help="the specialists' names, in turn order")
    ss = sub.add_parser("subset", help="split caption pairs into the recaptioned subset and the rest (by id hash)")
    ss.add_argument("--data", required=True)
    ss.add_argument("--fraction", type=float, required=True)
    ss.add_argument("--out", required=True, help="the subset (.jsonl)")
    ss.add_argument("--rest", required=True, help="the other records (.jsonl)")
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
    elif args.cmd == "append":
        from vlmjax.recipes.vila2.specialist import append, check_name

        try:
            names = [check_name(n) for n in args.specialists]
        except ValueError as e:
            p.error(str(e))
        if len(set(names)) != len(names):
            p.error(f"--specialists: each once, got {names}")
        # the round's captions (caption_qa records read as captions too: their turns are kept from the record)
        out = append(SourceSpec(format="caption", path=args.data), args.out, args.round, names, limit=args.limit)
        out = {k: v for k, v in out.items() if k != "bad_records"}
    elif args.cmd == "subset":
        from vlmjax.recipes.vila2.subset import split

        if not 0.0 <= args.fraction <= 1.0:
            p.error(f"--fraction must be in [0, 1], got {args.fraction}")
        out = split(SourceSpec(format="caption", path=args.data), args.fraction, args.out, args.rest)
    elif args.cmd == "specialist" and args.action == "train":
        out = train_specialist_cli(p, args)
    else:
        out = recaption_cli(p, args)
    print(json.dumps(out))
    return out


def recaption_cli(p, args) -> dict:
    """`recaption` and `specialist recaption`: load the model, then `recaption` / `recaption_specialist`."""
    cli.require_paths(p, model=(args.model, "dir"))
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.generate import GenerationConfig, SamplingConfig, default_eos_ids, load_model
    from vlmjax.recipes.vila2.recaption import recaption
    from vlmjax.recipes.vila2.specialist import domain_prompts, recaption_specialist, specialist_dir
    from vlmjax.recipes.vila2.state import RunState

    name = args.model_name or os.path.normpath(args.model)
    specialist = args.cmd == "specialist"
    try:
        folder = specialist_dir(args.out, args.name) if specialist else args.out
        prompts = domain_prompts(args.name, args.prompt) if specialist else None
    except ValueError as e:
        p.error(str(e))
    RunState(folder).start(args.round, name)  # another model's round fails here, before loading weights
    model, cfg, tok = load_model(args.model)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=SamplingConfig(args.temperature),
                              eos_token_ids=default_eos_ids(tok, cfg), seed=args.seed)
    spec = SourceSpec(format="caption", path=args.data, image_root=args.image_root)
    kw = dict(batch_size=args.batch_size, shard_index=args.shard_index, shard_count=args.shard_count,
              limit=args.limit)
    if specialist:
        return recaption_specialist(model, tok, spec, args.out, args.round, args.name, name, config,
                                    prompts=prompts, **kw)
    return recaption(model, tok, spec, args.out, args.round, name, config, **kw)


def train_specialist_cli(p, args) -> dict:
    from vlmjax.recipes.vila2.specialist import train_specialist

    cli.require_paths(p, config=(args.config, "file"), model=(args.model, "dir"))
    over = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            p.error(f"--set {item}: expected KEY=VALUE")
        over[key] = _literal(value)
    try:
        export = train_specialist(args.config, args.model, args.data, args.image_root, args.workdir,
                                  stage=args.stage, over=over, steps_scale=args.steps_scale, epochs=args.epochs)
    except ValueError as e:
        p.error(str(e))
    log = json.loads((export.parent / "stage.json").read_text())
    return {"export": str(export), **{k: v for k, v in log.items() if k != "losses"}}


def _pairs(p, items, sep, what):
    out = []
    for item in items:
        left, eq, right = item.partition(sep)
        if not eq or not left or not right:
            p.error(f"{what}: expected {what.split()[-1]}, got {item!r}")
        out.append((left, right))
    return out


def _literal(text: str):
    from vlmjax.train.config_io import parse_value  # the trainer's --config.KEY=VALUE parsing

    return parse_value(text)


def run_loop_cli(p, args) -> dict:
    from vlmjax.eval.easy_vqa import evaluate_by_kind
    from vlmjax.generate import GenerationConfig, SamplingConfig
    from vlmjax.recipes.vila2.loop import LoopSpec, run_loop, stage_overrides

    cli.require_paths(p, captions=(args.captions, "file"), config=(args.config, "file"))
    try:
        over = stage_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    roots = dict(_pairs(p, args.source_root, "=", "--source-root STAGE=DIR"))
    sources = {stage: {"path": path, "image_root": roots.get(stage)}
               for stage, path in _pairs(p, args.source, "=", "--source STAGE=PATH")}
    first = {k: v for k, v in (("model_path", args.model_path), ("tokenizer", args.tokenizer),
                               ("load_params", args.load_params)) if v is not None}
    from vlmjax.train.config_io import load_module

    defaults = dict(getattr(load_module(args.config), "RECAPTION", {}))
    pick = (lambda given, key, fallback: given if given is not None else defaults.get(key, fallback))
    extra = {"prompts": tuple(defaults["prompts"])} if "prompts" in defaults else {}
    try:
        spec = LoopSpec(config_file=args.config, stages=tuple(args.stages), captions=args.captions,
                        image_root=args.image_root, caption_stages=tuple(args.caption_stages),
                        sources=sources, first=first, over=over,
                        mode=pick(args.mode, "mode", "concat"), recaption_stage=args.recaption_stage,
                        limit=args.limit, caption_format=args.caption_format, caption_source=args.caption_source,
                        chat_template=args.chat_template,
                        generation=GenerationConfig(max_new_tokens=pick(args.max_new_tokens, "max_new_tokens", 128),
                                                    slots=args.slots,
                                                    sampling=SamplingConfig(pick(args.temperature, "temperature",
                                                                                 0.7)),
                                                    seed=args.seed),
                        eval_fn=lambda model, out: evaluate_by_kind(model, out, n=args.n_eval),
                        average=("accuracy", "describe_both"), **extra)
    except ValueError as e:
        p.error(str(e))
    summary = run_loop(spec, args.out, args.rounds, min_gain=args.min_gain)
    return {"last": summary["last"], "stopped": summary["stopped"],
            "average": {k: (e.get("eval") or {}).get("average") for k, e in summary["rounds"].items()}}


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    main()
