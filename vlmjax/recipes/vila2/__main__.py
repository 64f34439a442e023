"""VILA^2 command line: recaption and combine one round (see the package docstring).

    python -m vlmjax.recipes.vila2 recaption --model M --data CAPTIONS --image-root R --round K --out DIR
    python -m vlmjax.recipes.vila2 combine --data CAPTIONS --round K --out DIR [--mode concat|replace|original]

recaption: --shard-index / --shard-count run one host's share as a separate job (default: this jax process of
all); combine merges the shards and checks that every id is there once. Prints the counts as one JSON line.
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

    cli.require_paths(p, data=(args.data, "file"))
    if args.cmd == "combine":
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


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()
    main()
