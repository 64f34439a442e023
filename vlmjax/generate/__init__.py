"""Generation: a KV-cache engine (batched prefill + jitted decode loop) and a dataset runner.

    from vlmjax.generate import generate, GenerationConfig, SamplingConfig
    outs = generate(model, [prompt_ids, ...], GenerationConfig(max_new_tokens=64, eos_token_ids=eos),
                    pixel_values=px, image_rows=rows, tokenizer=tok)

    generate_dataset(model, tok, llava_requests("data.json", "images/"), "out.jsonl", config)   # resumable
    generate_dataset(..., GenerationConfig(slots=32))   # continuous batching: finished rows' slots refilled

`simple.greedy_generate` is the uncached reference loop the engine is tested against.
"""

from vlmjax.generate.continuous import Prompt, generate_continuous, iter_generate
from vlmjax.generate.dataset import generate_dataset
from vlmjax.generate.engine import Generation, GenerationConfig, generate, unpad_left
from vlmjax.generate.loading import load_model, load_tokenizer
from vlmjax.generate.requests import Encoder, Request, collate_images, default_eos_ids, folder_requests, llava_requests
from vlmjax.generate.sampling import SamplingConfig

__all__ = [
    "generate", "GenerationConfig", "Generation", "SamplingConfig", "unpad_left", "generate_dataset", "load_model",
    "load_tokenizer", "Encoder", "Request", "collate_images", "default_eos_ids", "folder_requests", "llava_requests",
    "Prompt", "generate_continuous", "iter_generate",
]
