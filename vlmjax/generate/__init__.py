"""Generation: a KV-cache engine (batched prefill + jitted decode loop) and a dataset runner.

    from vlmjax.generate import generate, GenerationConfig, SamplingConfig
    outs = generate(model, [prompt_ids, ...], GenerationConfig(max_new_tokens=64, eos_token_ids=eos),
                    pixel_values=px, image_rows=rows, tokenizer=tok)

    generate_dataset(model, tok, llava_requests("data.json", "images/"), "out.jsonl", config)   # resumable
    reqs = requests_from_source(SourceSpec(format="caption", path="caps.jsonl", image_root="shards/*.tar"),
                                role="generate", prompt="Describe the image.")            # what training reads
    generate_dataset(..., GenerationConfig(slots=32))   # continuous batching: finished rows' slots refilled

`simple.greedy_generate` is the uncached reference loop the engine is tested against.
"""

from vlmjax.generate.continuous import Prompt, generate_continuous, iter_generate
from vlmjax.generate.dataset import generate_dataset, sample_keys
from vlmjax.generate.engine import Generation, GenerationConfig, generate, unpad_left
from vlmjax.generate.loading import load_model, load_tokenizer
from vlmjax.generate.requests import (Encoder, Request, collate_images, default_eos_ids, folder_requests, llava_requests,
                                     requests_from_source)
from vlmjax.generate.sampling import SamplingConfig
from vlmjax.generate.shards import merge_shards, shard_path, shard_paths

__all__ = [
    "generate", "GenerationConfig", "Generation", "SamplingConfig", "unpad_left", "generate_dataset", "sample_keys",
    "merge_shards", "shard_path", "shard_paths", "load_model", "load_tokenizer", "Encoder", "Request", "collate_images",
    "default_eos_ids", "folder_requests", "llava_requests", "requests_from_source", "Prompt", "generate_continuous",
    "iter_generate",
]
