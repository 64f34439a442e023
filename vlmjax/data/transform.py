"""The per-sample transform: raw record -> `Unit` (tokens + image tiles), or a `Skipped` marker.

This is the one place where the bad-sample policy is applied, because it is the one place that knows the sample's
id and source file; every failure below it is a `BadSample` that gets that context attached here.
"""

from __future__ import annotations

import functools

import numpy as np

from vlmjax.data import formats
from vlmjax.data.errors import BAD_RECORD, TOO_MANY_IMAGES, BadSample, BadSamplePolicy, Skipped
from vlmjax.data.image import ImageSpec, load_image
from vlmjax.data.image_store import open_image_store, resolve_image
from vlmjax.data.packing import Unit
from vlmjax.data.text import TextProcessor


class SampleTransform:
    """Callable on (index, record). `parts` = 2 for DPO (each image's tiles then occupy two batch slots)."""

    def __init__(self, *, fmt: str, source_name: str, image_root, image_spec: ImageSpec, text: TextProcessor,
                 policy: BadSamplePolicy, max_images: int, parts: int = 1, format_options: dict | None = None):
        if fmt not in formats.PARSERS:
            raise ValueError(f"unknown format {fmt!r}; one of {sorted(formats.PARSERS)}")
        self.parse = functools.partial(formats.PARSERS[fmt], **(format_options or {}))
        self.fmt, self.source_name = fmt, source_name
        self.store = open_image_store(image_root)
        self.image_spec, self.text, self.policy = image_spec, text, policy
        self.max_images, self.parts = max_images, parts
        if parts == 2 and fmt != "preference":
            raise ValueError("DPO needs the 'preference' format")
        if parts == 1 and fmt == "preference":
            raise ValueError("preference data needs mode='dpo'")

    def __call__(self, item):
        index, record = item
        sample_id = f"#{index}"
        try:
            if not isinstance(record, dict):
                raise BadSample(BAD_RECORD, getattr(record, "message", f"record is a {type(record).__name__}"))
            sample_id = formats.record_id(record) or sample_id
            return self._unit(self.parse(record), sample_id)
        except BadSample as e:
            e = e.with_context(sample_id, self.source_name)
            if self.policy.on_bad_sample == "error":
                raise e from None
            return Skipped(e.reason, e.sample_id, e.source, e.message)
        except Exception as e:
            e.add_note(f"while processing sample {sample_id!r} of {self.source_name}")
            raise

    def _unit(self, example: formats.Example, sample_id: str) -> Unit:
        pixels, per_image_pos = [], []
        for j, ref in enumerate(example.images):
            name = ref if isinstance(ref, str) else f"image {j}"
            tiles_j, pos_j = load_image(resolve_image(ref, self.store), self.image_spec, name)
            pixels.append(tiles_j)
            per_image_pos.append(pos_j)
        tiles = [len(p) for p in pixels]
        if self.parts * sum(tiles) > self.max_images:
            raise BadSample(TOO_MANY_IMAGES, f"{sum(tiles)} image tiles x {self.parts} > {self.max_images} "
                                             "image slots per batch")
        kw = dict(template=example.template, loss_on=example.loss_on, document=example.document,
                  image_pos=per_image_pos if self.image_spec.image_layout != "tiles" else None)
        if self.parts == 1:
            enc = self.text.encode(example.messages, tiles, **kw)
            seqs = ((enc.ids, enc.trained),)
            kept, image_pos = enc.num_images, enc.image_pos
        else:
            kw["untrained_replies"] = sum(m["role"] == "assistant" for m in example.messages)
            kw["loss_on"] = "assistant"  # DPO scores the replies only, whatever the SFT setting
            chosen = self.text.encode(example.messages + example.chosen, tiles, **kw)
            rejected = self.text.encode(example.messages + example.rejected, tiles, **kw)
            seqs = ((chosen.ids, chosen.trained), (rejected.ids, rejected.trained))
            kept, image_pos = len(tiles), chosen.image_pos  # same images, so the same positions
        pixels = pixels[:kept]
        size = self.image_spec.image_size
        stacked = np.concatenate(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
        return Unit(seqs, stacked, sample_id, image_pos)
