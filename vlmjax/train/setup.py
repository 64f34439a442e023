"""Build the model, tokenizer and data iterator that a training config names.

config.model.init:
  random    a fresh VLM from config.model.vlm (dict of VLMConfig fields; llm/vision sub-dicts)
  hf        an HF LLaVA folder (config.model.path)
  assemble  config.model.llm (HF folder / .gguf / 'smollm2') + config.model.vision (HF folder or a dict of
            VisionConfig fields for a fresh tower) + a fresh config.model.projector
  native    a vlmjax native model folder (vlmjax_config.json + safetensors by parameter path + tokenizer)
  checkpoint  a vlmjax export, native or HF (told apart by which config file the folder holds)
The tokenizer is the checkpoint's, or config.model.tokenizer ('smollm2' or an HF folder) for random init.

config.model.frozen_param_dtype (e.g. "bfloat16"; "" = off): the model is built in that dtype, and after the
adapters are attached `apply_param_dtypes` casts the parameters that train.trainable selects (LoRA, projector)
to config.model.param_dtype, so a 7B base is held (and loaded) in bf16 while the trained parameters, their
gradients and their Adam moments stay fp32 (STIC's LoRA at lr 1e-7: bf16 weights cannot hold those updates).
A fresh model (random, assemble) records the run's `data.image` preprocessing in its config; a loaded one already
records its own, and `data.image` may only restate it (see `data.image.model_image_spec`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from flax import nnx

from vlmjax.data.image import MODEL_FIELDS
from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig


def _tokenizer(name: str):
    if name == "smollm2":
        from vlmjax.data.assets import smollm2_tokenizer

        return smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def build_param_dtype(mc) -> str:
    """The dtype the model is built / loaded in: frozen_param_dtype when set, else param_dtype."""
    return mc.get("frozen_param_dtype") or mc.get("param_dtype", "float32")


def apply_param_dtypes(model: nnx.Module, mc, trainable: Sequence[str]) -> int:
    """With model.frozen_param_dtype set: parameters matching `trainable` -> model.param_dtype, the others ->
    frozen_param_dtype (floating ones; in place, concrete or abstract). Returns how many were cast."""
    frozen = mc.get("frozen_param_dtype") or ""
    if not frozen:
        return 0
    import jax
    import jax.numpy as jnp

    from vlmjax.train.optim import regex_filter

    match = regex_filter(trainable)
    dtypes = {True: jnp.dtype(mc.get("param_dtype", "float32")), False: jnp.dtype(frozen)}
    n = 0
    for path, node in list(nnx.iter_graph(model)):
        if not isinstance(node, nnx.Param):
            continue
        x = node.get_value()
        want = dtypes[bool(match(path, node))]
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == want:
            continue
        if isinstance(x, jax.ShapeDtypeStruct):
            node.set_value(jax.ShapeDtypeStruct(x.shape, want, sharding=x.sharding))
        else:
            node.set_value(x.astype(want))
        n += 1
    return n


def build_model(mc, image=None) -> tuple[nnx.Module, VLMConfig, object]:
    """`image`: the run's data.image settings, recorded in a fresh model's config (random / assemble)."""
    model, cfg, tok = _build(mc)
    if mc.init in ("random", "assemble") and image:
        cfg = _record_image(model, cfg, image.to_dict() if hasattr(image, "to_dict") else dict(image))
    return model, cfg, tok


# data.image keys a fresh model takes into its config (the rest are the tower's or derived: they must agree)
_RECORDED = {k: field for k, field in MODEL_FIELDS.items() if not field.startswith("vision.")}


def recorded_config(cfg: VLMConfig, image: dict) -> VLMConfig:
    """`cfg` with a fresh model's recorded preprocessing: the run's data.image settings (see build_model)."""
    image = {k: v for k, v in image.items() if v is not None}  # None: what the model's layout implies
    top = {_RECORDED[k]: (tuple(tuple(p) for p in v) if k == "grid_pinpoints" else v)
           for k, v in image.items() if k in _RECORDED}
    vision = {f"image_{k}": tuple(v) for k, v in image.items() if k in ("mean", "std")}
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision), **top)


def _record_image(model, cfg: VLMConfig, image: dict) -> VLMConfig:
    new = recorded_config(cfg, image)
    model.cfg = new
    return new


def attach_lora(model, lc, seed: int) -> None:
    """Add the config's LoRA adapters, unless the model came with adapters (a native folder exported with
    train.export_lora='adapter'): those continue, and a different rank in the config is an error naming both."""
    from vlmjax.models.lora import add_lora, lora_rank

    have = lora_rank(model)
    if have is None:
        if lc.rank:
            add_lora(model, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets, seed=seed)
        return
    if lc.rank and lc.rank != have:
        raise ValueError(f"lora.rank={lc.rank} but the loaded model carries rank-{have} adapters; set lora.rank={have} "
                         "to continue them, or export the previous stage with train.export_lora='merge'")


INITS = ("random", "assemble", "hf", "native", "checkpoint")  # config.model.init (module docstring)


def _build(mc) -> tuple[nnx.Module, VLMConfig, object]:
    dtype, pdtype = mc.get("dtype", "float32"), build_param_dtype(mc)
    if mc.init == "random":
        d = mc.vlm.to_dict() if hasattr(mc.vlm, "to_dict") else dict(mc.vlm)
        llm = LLMConfig(**{**d.pop("llm"), "dtype": dtype, "param_dtype": pdtype, "remat": mc.get("remat", "none")})
        vis = d.pop("vision")
        for k in ("image_mean", "image_std"):
            if k in vis:
                vis[k] = tuple(vis[k])
        vision = VisionConfig(**{**vis, "dtype": dtype, "param_dtype": pdtype})
        tok = _tokenizer(mc.tokenizer)
        if "image_token_id" not in d:
            from vlmjax.data import default_image_token_id

            d["image_token_id"] = default_image_token_id(tok)
        cfg = VLMConfig(llm=llm, vision=vision, dtype=dtype, param_dtype=pdtype, **d)
        if cfg.image_token_id >= llm.vocab_size:
            raise ValueError(f"model.vlm: image_token_id {cfg.image_token_id} >= vocab_size {llm.vocab_size}")
        return _init_random(cfg, mc.get("seed", 0)), cfg, tok
    if mc.init in ("hf", "checkpoint", "native"):
        from vlmjax.convert.native import load_folder

        model, cfg, tok = load_folder(mc.path, kind={"checkpoint": None}.get(mc.init, mc.init), dtype=dtype,
                                      param_dtype=pdtype)
        return model, _with_remat(model, cfg, mc), tok
    if mc.init == "assemble":
        from vlmjax.convert.assemble import assemble_vlm

        llm = mc.llm
        if llm == "smollm2":
            from vlmjax.convert.gguf import smollm2_gguf_path

            llm = smollm2_gguf_path()
        vision = mc.vision
        if not isinstance(vision, str):
            v = vision.to_dict() if hasattr(vision, "to_dict") else dict(vision)
            for k in ("image_mean", "image_std"):
                if k in v:
                    v[k] = tuple(v[k])
            vision = VisionConfig(**v)
        model, cfg, tok = assemble_vlm(llm, vision, projector=mc.get("projector", "mlp2x_gelu"),
                                       vision_feature_layer=mc.get("vision_feature_layer", -2),
                                       dtype=dtype, param_dtype=pdtype, seed=mc.get("seed", 0))
        return model, _with_remat(model, cfg, mc), tok
    raise ValueError(f"model.init={mc.init!r}: use random | hf | native | checkpoint | assemble")


def _init_random(cfg: VLMConfig, seed: int):
    from vlmjax.models.vlm import VLM

    return VLM(cfg, rngs=nnx.Rngs(seed))


def _with_remat(model, cfg: VLMConfig, mc) -> VLMConfig:
    """remat is an execution knob: rebuild the config's llm entry so the module uses it."""
    remat = mc.get("remat", "none")
    if remat == cfg.llm.remat:
        return cfg
    llm = dataclasses.replace(cfg.llm, remat=remat)
    model.llm.cfg = llm
    new = dataclasses.replace(cfg, llm=llm)
    model.cfg = new
    return new


def data_config(dc, cfg: VLMConfig, tokenizer, *, mode: str, seed: int):
    """ml_collections data section -> vlmjax.data.DataConfig, with image settings taken from the model."""
    from vlmjax.data import BadSamplePolicy, DataConfig, SourceSpec, TextSpec
    from vlmjax.data.image import model_image_spec

    d = dc.to_dict() if hasattr(dc, "to_dict") else dict(dc)
    sources = tuple(SourceSpec(**s) for s in d.pop("sources"))
    # data.image keys left None mean "what the model implies"
    image = model_image_spec(cfg, **{k: v for k, v in (d.pop("image", {}) or {}).items() if v is not None})
    text = TextSpec(image_token_id=cfg.image_token_id, **(d.pop("text", {}) or {}))
    bad = BadSamplePolicy(**(d.pop("bad_samples", {}) or {}))
    return DataConfig(sources=sources, image=image, text=text, bad_samples=bad, mode=mode, seed=seed, **d)
