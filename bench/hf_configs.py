"""HF `config.json` contents of the checkpoints the real-scale recipe configs name, embedded so that the benches
can build those models' shapes with no download and no weights (bench/memory.py --config).

Each dict is labelled with its source repo and holds the fields that set shapes (the file's other fields, e.g.
initializer_range or torch_dtype, are left out; fields the file leaves at their transformers defaults are written
out). `PLACEHOLDERS` maps the basenames the configs use as placeholder paths (`/path/to/Yi-1.5-9B-Chat`) to the
repo; a stage that starts from another stage's export (`model.init=checkpoint`) is resolved through that stage
(bench/memory.py `model_arch`).

`TOKENIZER_LEN` is len(tokenizer) of each LLM repo: `vlmjax.convert.assemble` adds `<image>` as a new special
token, so its id is that length, and the vocabulary grows to the next multiple of 64 above it.
"""

from __future__ import annotations

import os

# --- full LLaVA checkpoints (model.init = hf)
# llava-hf/llava-1.5-7b-hf (CLIP ViT-L/14-336, 24 layers, feature layer -2; Vicuna-7B, vocab 32064, <image> 32000)
LLAVA15_7B = {
    "model_type": "llava", "image_token_index": 32000, "projector_hidden_act": "gelu",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "text_config": {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                    "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "hidden_act": "silu"},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                      "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                      "hidden_act": "quick_gelu", "projection_dim": 768},
}
LLAVA = {"llava-hf/llava-1.5-7b-hf": LLAVA15_7B}

# --- LLMs (model.init = assemble: model.llm)
LLMS = {
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2},
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128009},
    "01-ai/Yi-1.5-9B-Chat": {  # LlamaForCausalLM, GQA 32 query / 4 kv heads
        "model_type": "llama", "vocab_size": 64000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0, "max_position_embeddings": 4096, "hidden_act": "silu", "tie_word_embeddings": False},
}
# their tokenizers hold no "<image>" and exactly vocab_size tokens (Llama-3's 256 reserved special tokens included)
TOKENIZER_LEN = {"meta-llama/Llama-2-7b-hf": 32000, "meta-llama/Meta-Llama-3-8B-Instruct": 128256,
                 "01-ai/Yi-1.5-9B-Chat": 64000}

# --- vision towers (model.init = assemble: model.vision; the vision half of the repo's config.json)
VISION = {
    "openai/clip-vit-large-patch14-336": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "projection_dim": 768},
    "google/siglip-so400m-patch14-384": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
        "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6},
}

# placeholder basenames in configs/ -> repo. The COINCIDE target (Vicuna-7B-v1.5 + CLIP-L/336 + LLaVA's stage-1
# projector, converted) has exactly llava-1.5-7b-hf's architecture.
PLACEHOLDERS = {
    "llava-1.5-7b-stage1": "llava-hf/llava-1.5-7b-hf",
    "Llama-2-7b-hf": "meta-llama/Llama-2-7b-hf",
    "Meta-Llama-3-8B-Instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "Yi-1.5-9B-Chat": "01-ai/Yi-1.5-9B-Chat",
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "siglip-so400m-patch14-384": "google/siglip-so400m-patch14-384",
}


def repo_for(path: str, table: dict, what: str) -> str:
    """A config's placeholder path (or a repo id) -> the repo whose config.json `table` embeds."""
    if path in table:
        return path
    repo = PLACEHOLDERS.get(os.path.basename(str(path).rstrip("/")))
    if repo is None or repo not in table:
        known = sorted(k for k, r in PLACEHOLDERS.items() if r in table)
        raise KeyError(f"{what} {path!r}: no embedded config.json in bench/hf_configs.py (known basenames: {known}; "
                       f"repos: {sorted(table)})")
    return repo


def tiny_text(d: dict) -> dict:
    """The same architecture at toy sizes (every sharded dim divisible by 8; the GQA ratio kept)."""
    heads = 8
    kv = max(1, heads * d.get("num_key_value_heads", d["num_attention_heads"]) // d["num_attention_heads"])
    return {**d, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": heads, "num_key_value_heads": kv}


def tiny_vision(d: dict) -> dict:
    """Toy tower: patch 7 on a 4x4 grid, or 5x5 where the real grid is odd (SigLIP-384/14: 27x27)."""
    grid = 5 if (d["image_size"] // d["patch_size"]) % 2 else 4
    return {**d, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": 7 * grid, "patch_size": 7}
