"""One place that turns a model path into (model, config, tokenizer) for generation, scoring and evaluation.

The trainer and recipes already hold a model in memory and call the function APIs directly; only the CLIs load
from disk, through `load_model`.
"""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path):
    """HF tokenizer of a model folder, or the one embedded in a GGUF file (SmolLM2's is cached by data.assets)."""
    path = Path(path)
    if path.suffix == ".gguf":
        from vlmjax.data.assets import SMOLLM2_GGUF, smollm2_tokenizer

        if path.name == SMOLLM2_GGUF:
            return smollm2_tokenizer()
        from vlmjax.convert.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None):
    """vlmjax native folder (vlmjax_config.json) or HF LLaVA folder -> VLM; HF *ForCausalLM folder or .gguf file
    -> text-only LLM. Returns (model, cfg, tok)."""
    path = Path(path)
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    from vlmjax.convert.native import is_native, load_native

    if is_native(path):
        model, cfg = load_native(path, **kw)
    elif path.suffix == ".gguf":
        from vlmjax.convert.gguf import load_gguf

        model, cfg = load_gguf(path, **kw)
    else:
        from vlmjax.convert import hf

        config = hf.read_config(path)
        is_vlm = config.get("model_type") == "llava" or any("Llava" in a for a in config.get("architectures") or [])
        model, cfg = (hf.load_vlm if is_vlm else hf.load_causal_lm)(path, **kw)
    return model, cfg, load_tokenizer(path)
