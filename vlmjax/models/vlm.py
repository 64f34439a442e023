"""LLaVA-style VLM: vision tower -> projector -> features spliced into the LLM's token embeddings.

Batch layout (see vlmjax/data): `input_ids` hold `image_token_id` at every image-feature position, expanded to
`tokens_per_image` per image. `pixel_values` (N, H, W, 3) is a fixed-size, zero-padded stack of the batch's
images and `image_rows` (N,) names each image's row (-1 = padding slot), ordered by (row, appearance). Features
are spliced by a per-row running count over placeholder tokens, so several images per row, packed rows,
text-only rows and padding slots anywhere (per-host stacks concatenated across hosts) all work with static shapes. The placeholder/feature count is checked on the host and a mismatch raises,
naming the sample: features are never spliced silently into the wrong place.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax.models.config import VLMConfig
from vlmjax.models.llm import LLM
from vlmjax.models.projector import Projector
from vlmjax.models.vit import VisionTower


def check_image_tokens(
    input_ids,
    image_rows,
    image_token_id: int,
    tokens_per_image: int,
    sample_ids: Sequence[str] | None = None,
) -> None:
    """Raise ValueError naming the sample whose placeholder count differs from its images' feature count."""
    ids = np.asarray(input_ids)
    rows = np.asarray(image_rows)
    valid = rows >= 0
    if np.any(np.diff(rows[valid]) < 0):
        raise ValueError(f"images must be ordered by batch row, got image_rows={rows.tolist()}")
    counts = (ids == image_token_id).sum(axis=1)
    for r in range(ids.shape[0]):
        n_img = int((rows == r).sum())
        if counts[r] != n_img * tokens_per_image:
            name = sample_ids[r] if sample_ids is not None else f"batch row {r}"
            raise ValueError(
                f"sample {name}: {int(counts[r])} image placeholder tokens (id {image_token_id}) but {n_img} image(s) "
                f"x {tokens_per_image} features = {n_img * tokens_per_image}"
            )
    if np.any(rows >= ids.shape[0]):
        raise ValueError(f"image_rows {rows.tolist()} point past the batch of {ids.shape[0]} rows")


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


class VLM(nnx.Module):
    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.llm = LLM(cfg.llm, rngs=rngs)

    def image_features(self, pixels_nhwc: jax.Array) -> jax.Array:
        """(N, H, W, 3) -> (N, tokens_per_image, D_llm)."""
        feats = self.vision.features(pixels_nhwc, self.cfg.vision_layers_used)
        if self.cfg.vision_feature_select == "default":
            feats = feats[:, 1:]
        return self.projector(feats)

    def embed(self, input_ids_bt, pixel_values=None, image_rows=None) -> jax.Array:
        cfg = self.cfg
        is_img_bt = input_ids_bt == cfg.image_token_id
        # the placeholder id may lie outside the vocab (it never reaches the embedding table)
        x_btd = self.llm.embed(jnp.where(is_img_bt, 0, input_ids_bt))
        if pixel_values is None:
            if _is_concrete(input_ids_bt) and bool(np.any(np.asarray(is_img_bt))):
                raise ValueError("input_ids contain image placeholder tokens but no pixel_values were given")
            return x_btd
        if image_rows is None:
            image_rows = jnp.zeros((pixel_values.shape[0],), jnp.int32) if input_ids_bt.shape[0] == 1 else None
        if image_rows is not None and _is_concrete(input_ids_bt, image_rows):
            check_image_tokens(input_ids_bt, image_rows, cfg.image_token_id, cfg.tokens_per_image)
        elif image_rows is None and _is_concrete(input_ids_bt):
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
        if image_rows is None:  # HF-style: images in global placeholder order
            idx_bt = (jnp.cumsum(is_img_bt.reshape(-1)) - 1).reshape(b, t)
        else:
            # k-th placeholder of row r -> image (first image of r) + k // T, feature k % T. Independent of where
            # padding slots sit, so per-host image stacks concatenated across hosts splice correctly.
            k_bt = jnp.cumsum(is_img_bt, axis=1) - 1
            first_b = jnp.argmax(image_rows[None, :] == jnp.arange(b)[:, None], axis=1)
            idx_bt = (first_b[:, None] + k_bt // t_img) * t_img + k_bt % t_img
        spliced = jnp.take(feats_flat, jnp.clip(idx_bt, 0, n_img * t_img - 1), axis=0)
        return jnp.where(is_img_bt[..., None], spliced, x_btd)

    def hidden_states(
        self, input_ids_bt, pixel_values=None, image_rows=None, positions_bt=None, segment_ids_bt=None, prefix_mask_bt=None
    ) -> jax.Array:
        x_btd = self.embed(input_ids_bt, pixel_values, image_rows)
        return self.llm.hidden_states(x_btd, positions_bt, segment_ids_bt, prefix_mask_bt)

    def __call__(
        self, input_ids_bt, pixel_values=None, image_rows=None, positions_bt=None, segment_ids_bt=None, prefix_mask_bt=None
    ) -> jax.Array:
        h_btd = self.hidden_states(input_ids_bt, pixel_values, image_rows, positions_bt, segment_ids_bt, prefix_mask_bt)
        return self.llm.logits(h_btd)
