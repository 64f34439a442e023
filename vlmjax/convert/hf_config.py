"""HF config.json dicts <-> our configs. Works on raw dicts so transformers 4 and 5 files both load."""

from __future__ import annotations

from typing import Any

from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig

LLM_FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
HF_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class UnsupportedModel(ValueError):
    pass


def _rope(d: dict[str, Any]) -> tuple[float, dict | None]:
    params = d.get("rope_parameters") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ("default", "linear", "llama3"):
            raise UnsupportedModel(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")
        if kind == "default":
            scaling = None
    return float(theta), scaling


def llm_config_from_hf(d: dict[str, Any]) -> LLMConfig:
    mt = d.get("model_type", "llama")
    if mt not in LLM_FAMILIES:
        raise UnsupportedModel(f"text model_type {mt!r} is not supported; supported: {sorted(LLM_FAMILIES)}")
    if d.get("mlp_bias"):
        raise UnsupportedModel("mlp_bias=True is not supported")
    theta, scaling = _rope(d)
    heads = d.get("num_attention_heads", 32)
    # as transformers builds them: Qwen2 always biases q/k/v, Mistral never, Llama q/k/v AND o_proj on attention_bias
    bias = {"qwen2": True, "mistral": False}.get(mt, bool(d.get("attention_bias", False)))
    return LLMConfig(
        vocab_size=d.get("vocab_size", 32000),
        hidden_size=d.get("hidden_size", 4096),
        intermediate_size=d.get("intermediate_size", 11008),
        num_layers=d.get("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d.get("hidden_size", 4096) // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bias,
        o_proj_bias=bias and mt == "llama",
        hidden_act=d.get("hidden_act", "silu"),
        sliding_window=d.get("sliding_window") if d.get("use_sliding_window", mt == "mistral") else None,
        family=LLM_FAMILIES[mt],
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
    )


def vision_config_from_hf(d: dict[str, Any]) -> VisionConfig:
    mt = d.get("model_type", "clip_vision_model")
    if mt in ("clip", "siglip"):  # a full dual-encoder config: take its vision half
        d, mt = d["vision_config"], f"{mt}_vision_model"
    kinds = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
    if mt not in kinds:
        raise UnsupportedModel(f"vision model_type {mt!r} is not supported; supported: {sorted(kinds)}")
    kind = kinds[mt]
    extra = {} if kind == "clip" else dict(zip(("image_mean", "image_std"), SIGLIP_MEAN_STD))
    return VisionConfig(
        kind=kind,
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 16 if kind == "siglip" else 32),
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
        hidden_act=d.get("hidden_act", "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"),
        num_channels=d.get("num_channels", 3),
        projection_dim=d.get("projection_dim"),
        **extra,
    )


def vlm_config_from_hf(d: dict[str, Any]) -> VLMConfig:
    """LlavaForConditionalGeneration or LlavaNextForConditionalGeneration (LLaVA-1.6: anyres + image_newline)."""
    mt = d.get("model_type")
    if mt not in ("llava", "llava_next"):
        raise UnsupportedModel(f"model_type {mt!r} is not a LLaVA model (expected 'llava' or 'llava_next')")
    layout = {}
    if mt == "llava_next":  # HF pinpoints are [height, width]; ours (width, height), same order
        layout = dict(image_layout="llava_next",
                      image_grid_pinpoints=tuple((int(w), int(h)) for h, w in d["image_grid_pinpoints"]))
    if not d.get("multimodal_projector_bias", True):
        raise UnsupportedModel("multimodal_projector_bias=False is not supported")
    fl = d.get("vision_feature_layer", -2)
    if not isinstance(fl, int):
        raise UnsupportedModel(f"vision_feature_layer must be one int, got {fl!r}")
    return VLMConfig(
        llm=llm_config_from_hf(d["text_config"]),
        vision=vision_config_from_hf(d["vision_config"]),
        projector="mlp2x_gelu",
        projector_act=d.get("projector_hidden_act", "gelu"),
        vision_feature_layer=fl,
        vision_feature_select=d.get("vision_feature_select_strategy", "default"),
        image_token_id=d.get("image_token_index", d.get("image_token_id", 32000)),
        **layout,
    )


def llm_config_to_hf(cfg: LLMConfig):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    kw = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.dim_per_head, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act=cfg.hidden_act, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    qkv_o = (cfg.attention_bias, cfg.o_proj_bias)
    if cfg.family == "llama":
        if qkv_o[0] != qkv_o[1]:
            raise UnsupportedModel(f"HF Llama biases q/k/v and o_proj together (attention_bias); this model has q/k/v "
                                   f"bias={qkv_o[0]}, o_proj bias={qkv_o[1]} (family='qwen2' has q/k/v bias only)")
        kw["attention_bias"] = cfg.attention_bias
    elif qkv_o != {"qwen2": (True, False), "mistral": (False, False)}[cfg.family]:
        raise UnsupportedModel(f"{cfg.family} cannot express q/k/v bias={qkv_o[0]}, o_proj bias={qkv_o[1]}; "
                               "use family='llama' (both) or 'qwen2' (q/k/v only)")
    if cfg.family == "mistral":
        kw["sliding_window"] = cfg.sliding_window
    if cfg.family == "qwen2":
        kw["use_sliding_window"] = False
    out = cls[cfg.family](**kw)
    out.architectures = [HF_ARCH[cfg.family]]
    return out


def vision_config_to_hf(cfg: VisionConfig):
    import transformers

    if cfg.patch_stem != "linear":
        raise UnsupportedModel(f"HF CLIP/SigLIP towers patchify linearly; vision.patch_stem={cfg.patch_stem!r} is "
                               "expressible only as a native folder (train.export_format='native')")

    kw = dict(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_channels=cfg.num_channels, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
    )
    if cfg.kind == "clip":
        return transformers.CLIPVisionConfig(projection_dim=cfg.projection_dim or cfg.hidden_size, **kw)
    return transformers.SiglipVisionConfig(vision_use_head=False, **kw)


def vlm_config_to_hf(cfg: VLMConfig):
    import transformers

    if cfg.projector != "mlp2x_gelu":
        raise UnsupportedModel(
            f"HF LlavaForConditionalGeneration only has the mlp2x_gelu projector; {cfg.projector!r} cannot be exported"
        )
    if cfg.image_token_id >= cfg.llm.vocab_size:
        raise UnsupportedModel(f"image_token_id {cfg.image_token_id} must be < vocab_size {cfg.llm.vocab_size} for HF")
    kw = dict(
        vision_config=vision_config_to_hf(cfg.vision).to_dict(),
        text_config=llm_config_to_hf(cfg.llm).to_dict(),
        image_token_index=cfg.image_token_id,
        projector_hidden_act=cfg.projector_act,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select,
        image_seq_length=cfg.tokens_per_image,
        tie_word_embeddings=cfg.llm.tie_word_embeddings,
    )
    if cfg.image_layout == "llava_next":
        pinpoints = [[h, w] for w, h in cfg.image_grid_pinpoints]
        out = transformers.LlavaNextConfig(image_grid_pinpoints=pinpoints, **kw)
        out.architectures = ["LlavaNextForConditionalGeneration"]
        return out
    out = transformers.LlavaConfig(**kw)
    out.architectures = ["LlavaForConditionalGeneration"]
    return out
