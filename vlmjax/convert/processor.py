"""HF processor files for an exported LLaVA folder (`preprocessor_config.json`, `processor_config.json`), so that
`AutoProcessor.from_pretrained(export)` preprocesses images and expands `<image>` exactly as vlmjax does.

The image processor is derived from the `data.image.ImageSpec` the model was fed (by default the one
`model_image_spec` implies, which generation also uses): LLaVA-1.5's pad-to-square with the mean colour is HF's
`do_pad`, a stretch is a square `size`, CLIP's crop is `shortest_edge` + centre crop; LLaVA-1.6 gets its anyres
grid. HF's PIL backend resamples as we do (measured identical); its torchvision backend, picked by default when
torchvision is installed, uses its own bicubic kernel, so pass `backend="pil"` for bit-identical pixels.
"""

from __future__ import annotations

import logging

from vlmjax.data.image import ImageSpec, model_image_spec
from vlmjax.models.config import VLMConfig

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
_PIL_RESAMPLE = {"lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling ids, as HF stores them


def image_processor_kwargs(spec: ImageSpec) -> dict:
    """`ImageSpec` -> kwargs of transformers' Llava(Next)ImageProcessor. Raises for what HF cannot express."""
    s = spec.image_size
    kw = dict(image_mean=list(spec.mean), image_std=list(spec.std), resample=_PIL_RESAMPLE[spec.resample],
              do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    if spec.tiling == "anyres":  # the global view is stretched to a square, as LlavaNextImageProcessor does
        if spec.resize_mode != "resize":
            raise ValueError(f"HF LLaVA-1.6 stretches the global view; resize_mode {spec.resize_mode!r} cannot be "
                             "written as a LlavaNextImageProcessor")
        return dict(kw, size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                    image_grid_pinpoints=[[h, w] for w, h in spec.grid_pinpoints])
    if spec.tiling != "none":
        raise ValueError(f"tiling {spec.tiling!r} has no HF LLaVA image processor")
    if spec.resize_mode == "crop":
        return dict(kw, size={"shortest_edge": s}, do_center_crop=True, crop_size={"height": s, "width": s},
                    do_pad=False)
    square = {"height": s, "width": s}
    return dict(kw, size=square, crop_size=square, do_center_crop=False,
                do_pad=spec.resize_mode == "pad_to_square_mean")


def save_processor(out_dir, cfg: VLMConfig, tokenizer, spec: ImageSpec | None = None) -> bool:
    """Write the image processor and, when `tokenizer` has `<image>` as the model's image token, the LLaVA processor
    into `out_dir`. Returns whether the full processor was written; logs why not otherwise (the weights are a valid
    HF LLaVA either way, so an export never fails here)."""
    import transformers

    spec = spec or model_image_spec(cfg)
    try:
        if spec.tokens_per_image != cfg.tokens_per_image:
            raise ValueError(f"the image spec gives {spec.tokens_per_image} tokens per image, the model "
                             f"{cfg.tokens_per_image}")
        kwargs = image_processor_kwargs(spec)
    except ValueError as e:
        log.warning("%s: no HF processor files: %s", out_dir, e)
        return False
    next_ = cfg.image_layout == "llava_next"
    ip_cls = transformers.LlavaNextImageProcessorPil if next_ else transformers.LlavaImageProcessorPil
    image_processor = ip_cls(**kwargs)
    image_processor.save_pretrained(out_dir)
    if tokenizer is None:
        log.warning("%s: no tokenizer given, so no processor config (AutoImageProcessor still loads)", out_dir)
        return False
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != cfg.image_token_id or len(
            tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        log.warning("%s: the tokenizer has no single %s token with the model's image token id %d, so no processor "
                    "config (AutoImageProcessor still loads)", out_dir, IMAGE_TOKEN, cfg.image_token_id)
        return False
    proc_cls = transformers.LlavaNextProcessor if next_ else transformers.LlavaProcessor
    processor = proc_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.vision.patch_size,
                         vision_feature_select_strategy=cfg.vision_feature_select, image_token=IMAGE_TOKEN,
                         num_additional_image_tokens=1 if cfg.vision.has_cls else 0,
                         chat_template=getattr(tokenizer, "chat_template", None))
    processor.save_pretrained(out_dir)
    return True
