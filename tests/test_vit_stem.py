"""vision.patch_stem="conv": the convolutional stem against torch's Conv2d stack, its native round trip, and the
HF export refusing it (HF CLIP/SigLIP patchify linearly)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from test_native import assert_same_params, tiny_cfg  # noqa: E402
from vlmjax.convert.hf_config import vlm_config_to_hf  # noqa: E402
from vlmjax.convert.native import load_native, save_native  # noqa: E402
from vlmjax.models import VLM  # noqa: E402
from vlmjax.models.config import VisionConfig  # noqa: E402
from vlmjax.models.vit import ConvStem, VisionTower  # noqa: E402


def conv_cfg(**kw):
    return VisionConfig(kind="siglip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                        num_layers=2, num_heads=2, patch_stem="conv", **kw)


def test_conv_stem_matches_torch_conv2d_stack():
    cfg = conv_cfg()
    stem = ConvStem(cfg, rngs=nnx.Rngs(0))
    # log2(8) = 3 stride-2 convolutions: 3 -> 8 -> 16 -> 32 channels (hidden 32 halved, floor 8)
    assert [tuple(k.shape) for k in stem.kernels] == [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32)]
    layers = []
    for i, (w, b) in enumerate(zip(stem.kernels, stem.biases)):
        conv = torch.nn.Conv2d(w.shape[2], w.shape[3], 3, stride=2, padding=1)
        with torch.no_grad():  # HWIO -> OIHW
            conv.weight.copy_(torch.from_numpy(np.asarray(w[...]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.array(b[...])))
        layers += ([torch.nn.GELU()] if i else []) + [conv]
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch.nn.Sequential(*layers)(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()  # (B, D, 4, 4)
    ref = ref.transpose(0, 2, 3, 1).reshape(2, 16, 32)  # row-major patches, as the linear patchify orders them
    np.testing.assert_allclose(np.asarray(stem(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)


def test_conv_stem_tower_runs_and_round_trips_natively(tmp_path):
    tower = VisionTower(conv_cfg(), rngs=nnx.Rngs(0))
    assert tower(jnp.zeros((1, 32, 32, 3))).shape == (1, 16, 32)
    base = tiny_cfg()
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, image_size=28, patch_size=4,
                                                               patch_stem="conv"))
    model = VLM(cfg, rngs=nnx.Rngs(0))
    save_native(model, tmp_path / "m")
    back, back_cfg = load_native(tmp_path / "m")
    assert back_cfg.vision.patch_stem == "conv"
    assert_same_params(model, back)


def test_conv_stem_is_checked_and_not_hf_exportable():
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        VisionConfig(patch_size=14, patch_stem="conv")
    with pytest.raises(ValueError, match="patch_stem must be"):
        VisionConfig(patch_stem="convnext")
    base = tiny_cfg()
    cfg = dataclasses.replace(base, vision=dataclasses.replace(base.vision, image_size=28, patch_size=4,
                                                               patch_stem="conv"))
    with pytest.raises(Exception, match="patch_stem='conv' is expressible only as a native folder"):
        vlm_config_to_hf(cfg)
