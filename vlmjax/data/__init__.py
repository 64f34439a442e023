"""Data pipeline for LLaVA-style VLM training: formats -> images + chat templates -> packed batches on grain.

Trainer entry point::

    config = DataConfig(sources=(SourceSpec(path="train.json", image_root="images/"),),
                        batch_size=8, seq_len=2048, max_images=16, image=ImageSpec(...), text=TextSpec())
    it = make_iterator(config, tokenizer)   # batches: see FORMATS.md; it.get_state()/set_state() to resume

Formats and the batch contract are documented in vlmjax/data/FORMATS.md.
"""

from vlmjax.data.errors import BadSample, BadSamplePolicy, TooManySkipped
from vlmjax.data.formats import Example
from vlmjax.data.image import CLIP_MEAN, CLIP_STD, SIGLIP_MEAN, SIGLIP_STD, ImageSpec, process_image
from vlmjax.data.pipeline import DataConfig, DataIterator, SourceSpec, batch_shapes, make_dataset, make_iterator
from vlmjax.data.text import TextProcessor, TextSpec, default_image_token_id

__all__ = [
    "BadSample", "BadSamplePolicy", "TooManySkipped", "Example", "CLIP_MEAN", "CLIP_STD", "SIGLIP_MEAN", "SIGLIP_STD",
    "ImageSpec", "process_image", "DataConfig", "DataIterator", "SourceSpec", "batch_shapes", "make_dataset",
    "make_iterator", "TextProcessor", "TextSpec", "default_image_token_id",
]
