"""A tower whose image size is not a multiple of its patch size (SigLIP-so400m-patch14-384: 384 = 27 x 14 + 6,
VILA-1.5-8B's tower) patchifies as HF's stride-p convolution does: the pixels past the last whole patch are
dropped. Tiny SigLIP at 30 px / patch 7 (4 x 4 patches, 2 px left over) against transformers."""

import numpy as np
import torch
import transformers

from hf_fixtures import _randomize
from vlmjax.convert import hf as hfconv


def test_siglip_patch_remainder_matches_hf(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=30, patch_size=7, vision_use_head=False)
    ref = transformers.SiglipVisionModel(hf_cfg).eval()
    _randomize(ref)
    ref.save_pretrained(tmp_path)
    px = np.random.default_rng(0).normal(size=(2, 3, 30, 30)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.tensor(px)).last_hidden_state.numpy()
    model, cfg = hfconv.load_vision_tower(tmp_path)
    assert (cfg.grid, want.shape[1]) == (4, 16)
    got = np.asarray(model(px.transpose(0, 2, 3, 1)))
    assert np.abs(want - got).max() <= 1e-4
    px[:, :, 28:, :] = px[:, :, :, 28:] = 0.0  # the dropped 2-px border changes nothing
    assert np.array_equal(got, np.asarray(model(px.transpose(0, 2, 3, 1))))
