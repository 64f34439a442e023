"""Tiny random HF models (torch CPU) used as the independent reference in parity tests."""

from __future__ import annotations

import numpy as np

V = 128  # vocab of the tiny text models; the image token is the last id
IMAGE_TOKEN = V - 1


def text_config(family: str, **over):
    import transformers

    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if family == "llama3":
        kw["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        family = "llama"
    if family == "smollm2":  # tied embeddings, 3:1 GQA as in SmolLM2-135M
        kw.update(tie_word_embeddings=True, num_attention_heads=6, num_key_value_heads=2, hidden_size=48,
                  rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
        family = "llama"
    kw.update(over)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
    if family == "mistral":
        kw["sliding_window"] = None
    return cls(**kw)


def vision_config(kind: str, head: bool = False):
    """Tiny CLIP / SigLIP tower; `head` gives SigLIP its attention-pool head (transformers' default, as released)."""
    import transformers

    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
              patch_size=7, num_channels=3)
    if kind == "clip":
        return transformers.CLIPVisionConfig(projection_dim=16, **kw)
    return transformers.SiglipVisionConfig(vision_use_head=head, **kw)


def make_llava(tmp_path, family: str, vision: str, seed: int = 0, *, vision_head: bool = False, text_over=None,
               **llava_kw):
    import torch
    import transformers

    torch.manual_seed(seed)
    tc, vc = text_config(family, **(text_over or {})), vision_config(vision, head=vision_head)
    cfg = transformers.LlavaConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(), image_token_index=IMAGE_TOKEN,
                                   image_seq_length=16, **llava_kw)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    return model


# LLaVA-1.6 grid for the 28 px tiny tower, HF order [height, width]
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84]]


def make_llava_next(tmp_path, family: str = "mistral", seed: int = 0, vocab: int = V, image_token: int = IMAGE_TOKEN,
                    **kw):
    """Tiny LlavaNextForConditionalGeneration (CLIP tower, 4x4 feature grid per 28 px tile), random weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlavaNextConfig(vision_config=vision_config("clip").to_dict(),
                                       text_config=text_config(family, vocab_size=vocab).to_dict(),
                                       image_token_index=image_token, image_grid_pinpoints=NEXT_PINPOINTS, **kw)
    model = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    return model


def make_causal_lm(tmp_path, family: str, seed: int = 0, **over):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(text_config(family, **over)).eval()
    _randomize(model)
    model.save_pretrained(tmp_path)
    return model


def _randomize(model):
    """HF inits norms to 1 and biases to 0; randomise every tensor so parity tests see every parameter."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight") or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def pixels_nchw(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)
