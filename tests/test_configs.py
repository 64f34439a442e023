"""Every shipped config loads, and its trainable / LoRA / group regexes match parameters of a model of that family."""

from pathlib import Path

import pytest
from flax import nnx

from vlmjax.models import LLMConfig, VisionConfig, VLMConfig, VLM
from vlmjax.models.lora import add_lora
from vlmjax.train.config_io import load_config, load_module
from vlmjax.train.optim import make_optimizer, split_trainable

ROOT = Path(__file__).resolve().parents[1] / "configs"


def _module(path):
    return load_module(str(path))


# (file, stage argument): a config with STAGES takes one of them after the colon (configs/stic/mini.py:sft)
CONFIGS = [(p, stage) for p in sorted(ROOT.rglob("*.py")) for stage in getattr(_module(p), "STAGES", (None,))]


@pytest.mark.parametrize("path,stage", CONFIGS,
                         ids=[f"{p.relative_to(ROOT)}{':' + s if s else ''}" for p, s in CONFIGS])
def test_config_regexes_select_parameters(path, stage):
    c = load_config(f"{path}:{stage}" if stage else path)  # the CLI's loader: filled defaults, validated
    cfg = VLMConfig(llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                  num_kv_heads=2),
                    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=16, intermediate_size=32,
                                        num_layers=2, num_heads=2), image_token_id=63)
    model = VLM(cfg, rngs=nnx.Rngs(0))
    if c.lora.rank:
        assert len(add_lora(model, rank=4, alpha=8.0, targets=c.lora.targets)) == 7  # q k v o gate up down
    _, trainable, rest = split_trainable(model, tuple(c.train.trainable))
    make_optimizer(c.optim, trainable, c.train.steps)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    for group in c.optim.groups:
        assert any(__import__("re").search(group["pattern"], p) for p in paths), group
    assert c.train.objective in ("sft", "dpo")


def test_vila2_real_scale_config_is_vilas_apart_from_the_recaptioned_pairs():
    """configs/vila2/llama2_7b.py: VILA's stages (same model, lr, batch, steps, templates); only the pretrain stage's
    COYO pairs differ, split into the recaptioned 5% subset and the rest at weights summing to VILA's pairs weight;
    the recaption settings and a specialist stage with VILA's SFT settings."""
    from vlmjax.recipes.vila2.prompts import PROMPTS

    vila, vila2 = _module(ROOT / "vila" / "llama2_7b.py"), _module(ROOT / "vila2" / "llama2_7b.py")
    assert vila2.STAGES == vila.STAGES + ("specialist",)
    for stage in vila.STAGES:
        a, b = (m.get_config(stage, workdir="W").to_dict() for m in (vila, vila2))
        if stage == "pretrain":
            docs, pairs = a["data"].pop("sources")
            docs2, rest, sub = b["data"].pop("sources")
            assert docs2 == docs and rest["name"] == "vila2_rest" and sub["name"] == vila2.CAPTION_SOURCE
            assert (rest["path"], sub["path"]) == (vila2.REST, vila2.SUBSET)
            assert rest["weight"] + sub["weight"] == pairs["weight"] and sub["weight"] == 0.05 * pairs["weight"]
            for s in (rest, sub):
                assert {k: v for k, v in s.items() if k not in ("path", "weight", "name")} == \
                    {k: v for k, v in pairs.items() if k not in ("path", "weight")}
        assert a == b, stage
    assert vila2.RECAPTION == {"prompts": PROMPTS, "max_new_tokens": 384, "temperature": 0.7, "mode": "concat",
                               "subset": 0.05}
    spec, sft = vila2.get_config("specialist", workdir="W").to_dict(), vila.get_config("sft", workdir="W").to_dict()
    (domain,) = spec["data"].pop("sources")
    assert domain["format"] == "llava" and len(sft["data"].pop("sources")) == 2
    for key in ("model", "train", "export_dir"):
        spec.pop(key), sft.pop(key)
    assert spec == sft  # optimiser, batch, template, seq_len as VILA's SFT
    c = load_config(f"{ROOT / 'vila2' / 'llama2_7b.py'}:specialist")
    assert (c.model.init, tuple(c.train.trainable)) == ("checkpoint", ("^projector/", "^llm/"))


def test_schedules_run_for_every_length_including_one_step():
    """A 1-step cosine run failed in optax (a cosine part of 0 steps); lengths >= 2 keep their values."""
    import numpy as np

    from vlmjax.train.optim import schedule

    for kind in ("cosine", "linear", "constant"):
        for total in (1, 2, 5):
            for warmup in (0, 1, 3):
                lrs = np.array([float(schedule(1e-3, total, kind=kind, warmup_steps=warmup)(i)) for i in range(total)])
                assert np.all(np.isfinite(lrs)) and lrs.max() <= 1e-3 * (1 + 1e-6), (kind, total, warmup, lrs)
    # warmup 2 of 6 then cosine to 0 over the 4 left: peak at step 2, half way at step 4 (numpy formula)
    lrs = [float(schedule(1e-3, 6, kind="cosine", warmup_steps=2)(i)) for i in range(6)]
    want = [0.0, 5e-4] + [1e-3 * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose(lrs, want, rtol=1e-6, atol=1e-12)
