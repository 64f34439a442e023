"""Run under 8 forced CPU devices (XLA_FLAGS set by the caller before jax is imported): forward a tiny VLM under
DP, FSDP, TP and FSDP+TP meshes and print JSON with the max deviation from the single-device result and the
PartitionSpecs the params received."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from vlmjax import sharding as shd
from vlmjax.models import LLMConfig, VisionConfig, VLMConfig, VLM


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = VLMConfig(
        llm=LLMConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4),
        vision=VisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        image_token_id=255,
    )
    T = cfg.tokens_per_image
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 200, size=(8, 40)).astype(np.int32)
    ids[::2, 3 : 3 + T] = 255  # images in even rows, text-only odd rows
    seg = np.ones_like(ids)
    seg[:, 35:] = 0  # padding
    pixels = rng.normal(size=(4, 28, 28, 3)).astype(np.float32)
    rows = np.array([0, 2, 4, 6], np.int32)
    fwd = lambda m, *a: m(*a)  # noqa: E731
    with jax.default_device(jax.devices()[0]):
        ref = np.asarray(VLM(cfg, rngs=nnx.Rngs(0))(ids, pixels, rows, None, seg))
    out = {}
    for name, axes in {"dp": (8, 1, 1), "fsdp": (2, 4, 1), "tp": (2, 1, 4), "fsdp_tp": (1, 2, 4)}.items():
        mesh = shd.make_mesh(*axes)
        model = shd.shard_module(VLM(cfg, rngs=nnx.Rngs(0)), mesh)
        with shd.use_mesh(mesh):
            args = [jax.device_put(x, shd.batch_sharding(mesh, x.shape)) for x in (ids, seg)]
            px = jax.device_put(pixels, shd.batch_sharding(mesh, pixels.shape))
            logits = nnx.jit(fwd)(model, args[0], px, rows, None, args[1])
            logits.block_until_ready()
        st = nnx.state(model)

        def spec_of(v):  # trailing Nones dropped: P('a', None) == P('a')
            spec = list(v[...].sharding.spec)
            while spec and spec[-1] is None:
                spec.pop()
            return spec

        specs = {
            "q_proj": spec_of(st["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]),
            "down_proj": spec_of(st["llm"]["layers"]["mlp"]["down_proj"]["kernel"]),
            "embed": spec_of(st["llm"]["embed_tokens"]),
            "vit_fc1": spec_of(st["vision"]["layers"]["fc1"]["kernel"]),
        }
        real = seg.astype(bool)
        out[name] = {"max_err": float(np.abs(np.asarray(logits)[real] - ref[real]).max()), "specs": specs,
                     "logits_sharding": str(logits.sharding.spec)}
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
