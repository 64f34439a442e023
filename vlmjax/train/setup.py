"""Build the model, tokenizer and data iterator that a training config names.

config.model.init:
  random    a fresh VLM from config.model.vlm (dict of VLMConfig fields; llm/vision sub-dicts)
  hf        an HF LLaVA folder (config.model.path)
  assemble  config.model.llm (HF folder / .gguf / 'smollm2') + config.model.vision (HF folder or a dict of
            VisionConfig fields for a fresh tower) + a fresh config.model.projector
  checkpoint  a vlmjax export (same as hf: exports are HF folders)
The tokenizer is the checkpoint's, or config.model.tokenizer ('smollm2' or an HF folder) for random init.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig


def _tokenizer(name: str):
    if name == "smollm2":
        from vlmjax.data.assets import smollm2_tokenizer

        return smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def build_model(mc) -> tuple[nnx.Module, VLMConfig, object]:
    dtype, pdtype = mc.get("dtype", "float32"), mc.get("param_dtype", "float32")
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
    if mc.init in ("hf", "checkpoint"):
        from transformers import AutoTokenizer

        from vlmjax.convert.hf import load_vlm

        model, cfg = load_vlm(mc.path, dtype=dtype, param_dtype=pdtype)
        return model, _with_remat(model, cfg, mc), AutoTokenizer.from_pretrained(mc.path)
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
    raise ValueError(f"model.init={mc.init!r}: use random | hf | checkpoint | assemble")


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
