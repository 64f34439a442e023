"""`python -m vlmjax.generate`: batched, resumable generation over a LLaVA JSON file or a folder of images.

    python -m vlmjax.generate --model HF_LLAVA_DIR --data data.json --image-folder images/ --out out.jsonl
    python -m vlmjax.generate --model HF_LLAVA_DIR --image-folder images/ --prompt "Describe the image." --out o.jsonl
    python -m vlmjax.generate --gguf model.gguf --data prompts.json --out out.jsonl          # text-only LLM

Rerunning with the same --out skips the ids already written. Sampling is greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
import json
import logging

from vlmjax.generate.dataset import generate_dataset
from vlmjax.generate.engine import GenerationConfig
from vlmjax.generate.loading import load_model
from vlmjax.generate.requests import Encoder, default_eos_ids, folder_requests, llava_requests
from vlmjax.generate.sampling import SamplingConfig


def parse_mesh(text: str | None):
    """"data,fsdp,tensor" sizes (-1 = the remaining devices), e.g. "-1,1,1" for data parallel on every device."""
    if not text:
        return None
    from vlmjax import sharding

    data, fsdp, tensor = (int(x) for x in text.split(","))
    return sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="vlmjax native or HF LLaVA (or causal LM) folder")
    src.add_argument("--gguf", help="GGUF file of a text-only LLM")
    p.add_argument("--data", help="LLaVA JSON / JSONL file of conversations (prompt = first human turn)")
    p.add_argument("--image-folder", help="root of the image paths in --data, or the images to describe")
    p.add_argument("--prompt", help="with --image-folder and no --data: the prompt for every image")
    p.add_argument("--out", required=True, help="output JSONL (resumable)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--template", default="auto", help="chat template: auto | hf | a built-in name")
    p.add_argument("--resize-mode", default=None, choices=["pad_to_square_mean", "resize", "crop"],
                   help="default: the model's (its config records it); a different value is an error")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. -1,1,1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.data:
        requests = llava_requests(args.data, args.image_folder, limit=args.limit)
    elif args.image_folder and args.prompt:
        requests = folder_requests(args.image_folder, args.prompt, limit=args.limit)
    else:
        p.error("give --data, or --image-folder with --prompt")
    mesh = parse_mesh(args.mesh)
    model, cfg, tok = load_model(args.model or args.gguf, dtype=args.dtype, mesh=mesh)
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
        eos_token_ids=default_eos_ids(tok, cfg),
        stop_strings=tuple(args.stop),
        seed=args.seed,
    )
    encoder = Encoder(tok, cfg, template=args.template, resize_mode=args.resize_mode)
    stats = generate_dataset(model, tok, requests, args.out, config, batch_size=args.batch_size, encoder=encoder,
                             mesh=mesh)
    print(json.dumps({**stats, "out": args.out}))
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
