"""Batched, resumable generation over the records the trainer reads, or over a folder of images.

    python -m vlmjax.generate --model HF_LLAVA_DIR --data data.json --image-folder images/ --out out.jsonl
    python -m vlmjax.generate --model DIR --format caption --data caps.jsonl --image-folder 'shards/*.tar' \\
        --prompt "Describe the image in detail." --out recaptions.jsonl
    python -m vlmjax.generate --model HF_LLAVA_DIR --image-folder images/ --prompt "Describe the image." --out o.jsonl
    python -m vlmjax.generate --gguf model.gguf --data prompts.json --out out.jsonl          # text-only LLM

Records are read by the training pipeline's parsers (vlmjax/data/FORMATS.md). A record that does not parse, or
whose image is missing or corrupt, is written as {"id", "error"} naming the sample and the file (never retried);
--on-bad-sample error stops at the first one instead. Rerunning with the same --out skips the ids already written.
Sampling is greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tarfile

from vlmjax.generate import cli

FORMATS = ("llava", "caption", "preference")  # interleaved documents can be scored, not prompted


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="vlmjax native or HF LLaVA (or causal LM) folder")
    src.add_argument("--gguf", help="GGUF file of a text-only LLM")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data", help="records: a .json list or .jsonl file in --format (llava: the prompt is the "
                      "conversation up to its first human turn)")
    data.add_argument("--tfds", help="records: a TFDS dataset name, read with tfds.data_source (needs the data extra)")
    p.add_argument("--tfds-split", default="train", help="split of --tfds (default: train)")
    p.add_argument("--tfds-data-dir", default=None, help="data_dir of --tfds (default: TFDS's)")
    p.add_argument("--format", default="llava", choices=FORMATS, help="record layout of --data / --tfds "
                   "(default: llava; caption: the image alone under the plain template, or --prompt)")
    p.add_argument("--image-folder", help="with records: their image root (a folder, a .tar shard or a quoted glob "
                   "of shards); without: the folder of images to run --prompt on")
    p.add_argument("--prompt", help="the instruction for every image of --image-folder, or one that replaces each "
                   "record's prompt")
    p.add_argument("--on-bad-sample", default="skip", choices=["skip", "error"],
                   help="skip: write an error record and go on (default); error: stop at the first bad record")
    p.add_argument("--out", required=True, help="output JSONL (resumable)")
    p.add_argument("--limit", type=cli.positive_int, default=None, help="only the first N records / images")
    p.add_argument("--batch-size", type=cli.positive_int, default=16, help="rows per batch (default: 16)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=128, help="tokens per reply (default: 128)")
    p.add_argument("--temperature", type=cli.non_negative_float, default=0.0,
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=cli.non_negative_int, default=0, help="keep the k likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=cli.probability, default=1.0, help="nucleus sampling mass in (0, 1]; 1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each sample's stream also depends on its id)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--template", default="auto", help="chat template: auto | hf | a built-in name (default: auto)")
    p.add_argument("--resize-mode", default=None, choices=["pad_to_square_mean", "resize", "crop"],
                   help="image preprocessing (default: the model's, which its config records; a different value is "
                   "an error)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("--mesh", type=cli.mesh_sizes, default=None,
                   help="data,fsdp,tensor device counts, e.g. -1,1,1 (data parallel on every device)")
    return p


def build_requests(p: argparse.ArgumentParser, args):
    from vlmjax.data.pipeline import SourceSpec
    from vlmjax.generate.requests import folder_requests, requests_from_source

    if args.data is None and args.tfds is None:
        if not (args.image_folder and args.prompt):
            p.error("give --data or --tfds, or --image-folder with --prompt")
        cli.require_paths(p, image_folder=(args.image_folder, "dir"))
        return folder_requests(args.image_folder, args.prompt, limit=args.limit)
    cli.require_paths(p, data=(args.data, "file"))
    spec = SourceSpec(format=args.format, path=args.data, tfds=args.tfds, tfds_split=args.tfds_split,
                      tfds_data_dir=args.tfds_data_dir, image_root=args.image_folder)
    try:
        return requests_from_source(spec, role="generate", prompt=args.prompt, on_bad_sample=args.on_bad_sample,
                                    limit=args.limit)
    except (OSError, ValueError, tarfile.ReadError) as e:  # missing image root, invalid .json, a bad record
        p.error(str(e))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cli.require_paths(p, model=(args.model, "dir"), gguf=(args.gguf, "file"))
    requests = build_requests(p, args)
    mesh = cli.make_mesh_or_exit(p, args.mesh)

    from vlmjax.generate.dataset import generate_dataset
    from vlmjax.generate.engine import GenerationConfig
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.generate.loading import load_model
    from vlmjax.generate.requests import Encoder, default_eos_ids
    from vlmjax.generate.sampling import SamplingConfig

    model, cfg, tok = load_model(args.model or args.gguf, dtype=args.dtype, mesh=mesh)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
        eos_token_ids=default_eos_ids(tok, cfg),
        stop_strings=tuple(args.stop),
        seed=args.seed,
    )
    encoder = Encoder(tok, cfg, template=args.template, resize_mode=args.resize_mode)
    if args.on_bad_sample == "error":
        encoder = _Strict(encoder)
    try:
        stats = generate_dataset(model, tok, requests, args.out, config, batch_size=args.batch_size,
                                 encoder=encoder, mesh=mesh)
    except StopOnBadSample as e:
        # on a line of its own: the progress bar's line is left open when the run stops
        print(f"\n{p.prog}: error: {e} (outputs so far are kept in {args.out})", file=sys.stderr)
        return 1
    errors = sum("error" in r for r in read_jsonl(args.out).values())
    if errors:
        logging.getLogger("vlmjax.generate").warning("%d error records in %s (samples that could not be read)",
                                                     errors, args.out)
    print(json.dumps({**stats, "errors": errors, "out": args.out}))
    return 0


class StopOnBadSample(RuntimeError):
    pass


class _Strict:
    """--on-bad-sample error: a sample that cannot be encoded (missing image, ...) stops the run. The runner writes
    encoding failures (ValueError / OSError) as error records, so they leave the encoder as a RuntimeError."""

    def __init__(self, encoder):
        self._encoder = encoder

    def __getattr__(self, name):
        return getattr(self._encoder, name)

    def prompt(self, req):
        try:
            return self._encoder.prompt(req)
        except (ValueError, OSError) as e:
            raise StopOnBadSample(str(e)) from e


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
