"""Assemble a new VLM from parts: a pretrained LLM (HF folder or GGUF) + a vision tower (HF folder, or a fresh
one from a config) + a freshly initialised projector. This is how a user starts VILA stage 1.

The `<image>` placeholder is added to the tokenizer as a special token. When its id falls outside the LLM's
vocabulary the embedding (and untied lm_head) grow to the next multiple of 64, new rows set to the mean row, as
LLaVA does; HF LLaVA needs the placeholder id inside the vocabulary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig
from vlmjax.models.projector import Projector
from vlmjax.models.vit import VisionTower
from vlmjax.models.vlm import VLM

IMAGE_TOKEN = "<image>"


def load_llm(path, dtype: str = "float32", param_dtype: str = "float32"):
    """(LLM, LLMConfig, tokenizer) from an HF *ForCausalLM folder or a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from vlmjax.convert.gguf import load_gguf, load_gguf_tokenizer

        model, cfg = load_gguf(path, dtype=dtype, param_dtype=param_dtype)
        return model, cfg, load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    from vlmjax.convert.hf import load_causal_lm

    model, cfg = load_causal_lm(path, dtype=dtype, param_dtype=param_dtype)
    return model, cfg, AutoTokenizer.from_pretrained(str(path))


def _grow_vocab(llm, cfg: LLMConfig, new_vocab: int) -> LLMConfig:
    if new_vocab <= cfg.vocab_size:
        return cfg
    def grow(table_vd):
        extra = jnp.broadcast_to(table_vd.mean(0, keepdims=True), (new_vocab - table_vd.shape[0], table_vd.shape[1]))
        return jnp.concatenate([table_vd, extra.astype(table_vd.dtype)], 0)

    llm.embed_tokens.set_value(grow(llm.embed_tokens[...]))
    if llm.lm_head is not None:
        llm.lm_head.kernel.set_value(grow(llm.lm_head.kernel[...].T).T)
    return dataclasses.replace(cfg, vocab_size=new_vocab)


def assembled_config(llm_cfg: LLMConfig, vis_cfg: VisionConfig, image_token_id: int, *, projector: str = "mlp2x_gelu",
                     vision_feature_layer: int = -2, vision_feature_select: str | None = None,
                     dtype: str = "float32", param_dtype: str = "float32") -> VLMConfig:
    """The VLMConfig `assemble_vlm` builds from its parts' configs (no weights): the vocabulary grown to hold
    `image_token_id` (next multiple of 64), feature select 'default' for a tower with a class token, else 'full'."""
    llm_cfg = dataclasses.replace(llm_cfg, vocab_size=max(llm_cfg.vocab_size, -(-(image_token_id + 1) // 64) * 64))
    select = vision_feature_select or ("default" if vis_cfg.has_cls else "full")
    cfg = VLMConfig(llm=llm_cfg, vision=vis_cfg, projector=projector, vision_feature_layer=vision_feature_layer,
                    vision_feature_select=select, image_token_id=image_token_id, dtype=dtype, param_dtype=param_dtype)
    cfg.tokens_per_image  # validates the projector / feature-select combination early
    return cfg


def assemble_vlm(
    llm_path,
    vision: str | Path | VisionConfig,
    *,
    projector: str = "mlp2x_gelu",
    vision_feature_layer: int = -2,
    vision_feature_select: str | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
    seed: int = 0,
):
    """-> (VLM, VLMConfig, tokenizer). `vision` is an HF vision folder, or a VisionConfig for a fresh tower."""
    llm, llm_cfg, tokenizer = load_llm(llm_path, dtype, param_dtype)
    if isinstance(vision, VisionConfig):
        vis_cfg = dataclasses.replace(vision, dtype=dtype, param_dtype=param_dtype)
        tower = VisionTower(vis_cfg, rngs=nnx.Rngs(seed + 1))
    else:
        from vlmjax.convert.hf import load_vision_tower

        tower, vis_cfg = load_vision_tower(vision, dtype=dtype, param_dtype=param_dtype)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = assembled_config(llm_cfg, vis_cfg, image_token_id, projector=projector,
                           vision_feature_layer=vision_feature_layer, vision_feature_select=vision_feature_select,
                           dtype=dtype, param_dtype=param_dtype)
    _grow_vocab(llm, llm_cfg, cfg.llm.vocab_size)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(seed))))
    state["llm"] = nnx.state(llm)
    state["vision"] = nnx.state(tower)
    state["projector"] = nnx.state(Projector(cfg, rngs=nnx.Rngs(seed + 2)))
    return nnx.merge(graphdef, state), cfg, tokenizer
