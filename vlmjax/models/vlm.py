"""LLaVA-style VLM: vision tower -> projector -> features spliced into the LLM's token embeddings.

Batch layout (see vlmjax/data): `input_ids` hold `image_token_id` at every image-feature position, expanded to
`tokens_per_image` per image. `pixel_values` (N, H, W, 3) is a fixed-size, zero-padded stack of the batch's
images and `image_rows` (N,) names each image's row (-1 = padding slot), ordered by (row, appearance). Features
are spliced by a per-row running count over placeholder tokens, so several images per row, packed rows,
text-only rows and padding slots anywhere (per-host stacks concatenated across hosts) all work with static shapes.
The placeholder/feature count is checked on the host and a mismatch raises, naming the sample: features are never
spliced silently into the wrong place.

Layouts whose token count depends on the image (LLaVA-1.6: the tile grid cropped to the image's aspect ratio, a
learned newline per feature row) come with `image_pos` (B, K): the j-th image token of row b takes feature
image_pos[b, j] of the row's tiles (tile-major, tokens_per_image each), -1 = `image_newline`. It is computed on
the host (`vlmjax.data.tiling.llava_next_positions`), so the model stays shape-static.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.models.config import VLMConfig, to_dtype
from vlmjax.models.layers import normal_init, param
from vlmjax.models.llm import LLM
from vlmjax.models.projector import Projector
from vlmjax.models.vit import VisionTower


def check_image_tokens(
    input_ids,
    image_rows,
    image_token_id: int,
    tokens_per_image: int,
    sample_ids: Sequence[str] | None = None,
    image_pos=None,
) -> None:
    """Raise ValueError naming the sample whose placeholder count differs from its images' feature count (with
    `image_pos`: whose positions point outside its images' features)."""
    ids = np.asarray(input_ids)
    rows = np.asarray(image_rows)
    valid = rows >= 0
    if np.any(np.diff(rows[valid]) < 0):
        raise ValueError(f"images must be ordered by batch row, got image_rows={rows.tolist()}")
    counts = (ids == image_token_id).sum(axis=1)
    for r in range(ids.shape[0]):
        n_img = int((rows == r).sum())
        name = sample_ids[r] if sample_ids is not None else f"batch row {r}"
        if image_pos is not None:
            pos = np.asarray(image_pos)[r]
            if counts[r] > len(pos):
                raise ValueError(f"sample {name}: {int(counts[r])} image tokens but image_pos holds {len(pos)}")
            pos = pos[: counts[r]]
            if len(pos) and (pos.max() >= n_img * tokens_per_image or pos.min() < -1):
                raise ValueError(f"sample {name}: image_pos spans [{pos.min()}, {pos.max()}] but the row has "
                                 f"{n_img} image tile(s) x {tokens_per_image} features")
            continue
        if counts[r] != n_img * tokens_per_image:
            raise ValueError(
                f"sample {name}: {int(counts[r])} image placeholder tokens (id {image_token_id}) but {n_img} image(s) "
                f"x {tokens_per_image} features = {n_img * tokens_per_image}"
            )
    if np.any(rows >= ids.shape[0]):
        raise ValueError(f"image_rows {rows.tolist()} point past the batch of {ids.shape[0]} rows")


def stack_image_pos(per_row, rows: int, width: int) -> np.ndarray:
    """Per-row `image_pos` arrays (None: no images) -> the (rows, width) int32 array the model takes."""
    out = np.zeros((rows, width), np.int32)
    for r, pos in enumerate(per_row):
        if pos is not None:
            if len(pos) > width:
                raise ValueError(f"row {r}: {len(pos)} image positions do not fit width {width}")
            out[r, :len(pos)] = pos
    return out


def host_image_inputs(cfg: VLMConfig, ids_bt, pixel_values, image_rows=None, image_pos=None):
    """Host-side defaults and checks before a jitted call: image_rows (None: all images in row 0) and `image_pos`
    as the (B, S) array (from per-row arrays). Returns both."""
    ids = np.asarray(ids_bt)
    if image_rows is None:
        image_rows = np.zeros((len(pixel_values),), np.int32)
    image_rows = np.asarray(image_rows, np.int32)
    if image_pos is not None and not isinstance(image_pos, np.ndarray):
        image_pos = stack_image_pos(image_pos, ids.shape[0], ids.shape[1])
    check_image_tokens(ids, image_rows, cfg.image_token_id, cfg.tokens_per_image, image_pos=image_pos)
    return image_rows, image_pos


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


class VLM(nnx.Module):
    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.llm = LLM(cfg.llm, rngs=rngs)
        d = cfg.llm.hidden_size
        self.image_newline = (param(rngs, normal_init(d**-0.5), (d,), ("embed",), to_dtype(cfg.param_dtype))
                              if cfg.image_layout == "llava_next" else None)

    def image_features(self, pixels_nhwc: jax.Array) -> jax.Array:
        """(N, H, W, 3) -> (N, tokens_per_image, D_llm)."""
        feats = self.vision.features(pixels_nhwc, self.cfg.vision_layers_used)
        if self.cfg.vision_feature_select == "default":
            feats = feats[:, 1:]
        return self.projector(feats)

    def embed(self, input_ids_bt, pixel_values=None, image_rows=None, image_pos=None) -> jax.Array:
        cfg = self.cfg
        if (image_pos is None) != (self.image_newline is None) and pixel_values is not None:
            raise ValueError(f"image_layout={cfg.image_layout!r} " + (
                "needs image_pos (from the data pipeline or the generation encoder)" if image_pos is None
                else "takes no image_pos"))
        is_img_bt = input_ids_bt == cfg.image_token_id
        # the placeholder id may lie outside the vocab (it never reaches the embedding table)
        x_btd = self.llm.embed(jnp.where(is_img_bt, 0, input_ids_bt))
        if pixel_values is None:
            if _is_concrete(input_ids_bt) and bool(np.any(np.asarray(is_img_bt))):
                raise ValueError("input_ids contain image placeholder tokens but no pixel_values were given")
            return x_btd
        if image_rows is None:
            image_rows = jnp.zeros((pixel_values.shape[0],), jnp.int32) if input_ids_bt.shape[0] == 1 else None
        if image_rows is not None and _is_concrete(input_ids_bt, image_rows, image_pos):
            check_image_tokens(input_ids_bt, image_rows, cfg.image_token_id, cfg.tokens_per_image, image_pos=image_pos)
        elif image_rows is None and image_pos is None and _is_concrete(input_ids_bt):
            n_tok = int(np.asarray(is_img_bt).sum())
            if n_tok != pixel_values.shape[0] * cfg.tokens_per_image:
                raise ValueError(
                    f"{n_tok} image placeholder tokens but {pixel_values.shape[0]} images x {cfg.tokens_per_image}"
                    " features; pass image_rows to locate the mismatching sample"
                )
        feats_nd = self.image_features(pixel_values).astype(x_btd.dtype)
        n_img, t_img, _ = feats_nd.shape
        feats_flat = feats_nd.reshape(n_img * t_img, -1)
        b, t = input_ids_bt.shape
        newline_bt = None
        if image_rows is None and image_pos is None:  # HF-style: images in global placeholder order
            idx_bt = (jnp.cumsum(is_img_bt.reshape(-1)) - 1).reshape(b, t)
        else:
            # k-th placeholder of row r -> feature k of the row's tiles (or image_pos[r, k]), counted from the
            # row's first image. Independent of where padding slots sit, so per-host image stacks concatenated
            # across hosts splice correctly.
            k_bt = jnp.cumsum(is_img_bt, axis=1) - 1
            if image_pos is not None:
                k_bt = jnp.take_along_axis(image_pos, jnp.clip(k_bt, 0, image_pos.shape[1] - 1), axis=1)
                newline_bt = is_img_bt & (k_bt < 0)
                k_bt = jnp.maximum(k_bt, 0)
            if image_rows is None:
                image_rows = jnp.zeros((n_img,), jnp.int32)
            first_b = jnp.argmax(image_rows[None, :] == jnp.arange(b)[:, None], axis=1)
            idx_bt = first_b[:, None] * t_img + k_bt
        spliced = jnp.take(feats_flat, jnp.clip(idx_bt, 0, n_img * t_img - 1), axis=0)
        if newline_bt is not None:
            spliced = jnp.where(newline_bt[..., None], self.image_newline[...].astype(spliced.dtype), spliced)
        return jnp.where(is_img_bt[..., None], spliced, x_btd)

    def hidden_states(
        self, input_ids_bt, pixel_values=None, image_rows=None, positions_bt=None, segment_ids_bt=None,
        prefix_mask_bt=None, image_pos=None,
    ) -> jax.Array:
        x_btd = self.embed(input_ids_bt, pixel_values, image_rows, image_pos)
        return self.llm.hidden_states(x_btd, positions_bt, segment_ids_bt, prefix_mask_bt)

    def __call__(
        self, input_ids_bt, pixel_values=None, image_rows=None, positions_bt=None, segment_ids_bt=None,
        prefix_mask_bt=None, image_pos=None,
    ) -> jax.Array:
        h_btd = self.hidden_states(input_ids_bt, pixel_values, image_rows, positions_bt, segment_ids_bt,
                                   prefix_mask_bt, image_pos)
        return self.llm.logits(h_btd)


def llm_of(model):
    """The decoder of a VLM, or the model itself for a text-only LLM (generation, scoring and capture take both)."""
    return model.llm if hasattr(model, "llm") else model


def embed_inputs(model, ids_bt, pixel_values=None, image_rows=None, image_pos=None):
    """Input embeddings of a VLM (image features spliced in) or of a text-only LLM."""
    if hasattr(model, "llm"):
        return model.embed(ids_bt, pixel_values, image_rows, image_pos)
    return model.embed(ids_bt)
