"""Trainer behaviour on a tiny random VLM (SmolLM2 tokenizer) and tiny on-disk data."""

import numpy as np
import pytest
from flax import nnx

from train_utils import tiny_config, write_config_file, write_dataset
from vlmjax.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def losses(summary):
    return [h["loss"] for h in summary["history"]]


def test_sft_overfits(data, tmp_path):
    s = train(tiny_config(data, **{"train.steps": 30, "train.save_every": 100, "optim.lr": 1e-2,
                                   "optim.schedule": "constant"}), str(tmp_path))
    l = losses(s)
    assert np.isfinite(l).all()
    assert l[-1] < 0.3 * l[0], l
    assert (tmp_path / "metrics.jsonl").exists() and any((tmp_path / "tb").iterdir())


def test_resume_reproduces_uninterrupted_run(data, tmp_path):
    full = losses(train(tiny_config(data, **{"train.steps": 6, "train.save_every": 3}), str(tmp_path / "a")))
    first = train(tiny_config(data, **{"train.steps": 6, "train.save_every": 3}), str(tmp_path / "b"), stop_at=3)
    second = train(tiny_config(data, **{"train.steps": 6, "train.save_every": 3}), str(tmp_path / "b"))
    assert second["start"] == 3
    np.testing.assert_allclose(losses(first) + losses(second), full, rtol=1e-6)


def test_grad_accumulation_equals_bigger_batch(data, tmp_path):
    common = {"train.steps": 1, "data.pack": False, "loss.reduction": "sequence", "optim.warmup_steps": 0,
              "optim.schedule": "constant", "train.save_every": 100}
    big = train(tiny_config(data, **common, **{"data.batch_size": 4}), str(tmp_path / "big"))
    acc = train(tiny_config(data, **common, **{"data.batch_size": 2, "train.grad_accum": 2}), str(tmp_path / "acc"))
    a, b = nnx.state(big["model"], nnx.Param), nnx.state(acc["model"], nnx.Param)
    for (p, x), (_, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
        np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), rtol=1e-4, atol=1e-6, err_msg=str(p))
    np.testing.assert_allclose(big["history"][0]["loss"], acc["history"][0]["loss"], rtol=1e-5)


def test_frozen_params_bit_identical(data, tmp_path):
    cfg = tiny_config(data, **{"train.steps": 3, "train.trainable": ["^projector/"], "train.save_every": 100})
    from vlmjax.train.setup import build_model

    before = nnx.state(build_model(cfg.model)[0], nnx.Param)
    after = nnx.state(train(cfg, str(tmp_path))["model"], nnx.Param)
    changed = []
    for (p, x), (_, y) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        same = np.array_equal(np.asarray(x[...]), np.asarray(y[...]))
        if p[0] == "projector":
            changed.append(not same)
        else:
            assert same, p
    assert all(changed)


def test_lora_dpo_raises_margin_and_merge_preserves_logits(data, tmp_path):
    import json

    cfg = tiny_config(data, "dpo", **{"train.steps": 12, "train.trainable": ["lora_", "^projector/"],
                                      "lora.rank": 4, "lora.alpha": 8.0, "optim.lr": 3e-3, "dpo.loss": "stic",
                                      "dpo.beta": 0.5, "train.save_every": 100, "export_dir": str(tmp_path / "hf"),
                                      "optim.schedule": "constant", "train.eval_every": 12, "train.eval_batches": 4})
    cfg.eval_data = cfg.data.to_dict()
    cfg.eval_data["shuffle"] = False
    s = train(cfg, str(tmp_path))
    # the adapter starts at zero: policy == reference up to fp32 rounding (policy and reference are different
    # programs, each summing ~100 token log-probs of magnitude ~10: 1e-6 relative error is ~1e-5 here)
    assert abs(s["history"][0]["rewards/margin"]) < 1e-5
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval/rewards/margin" in r][-1]  # all 8 held-out pairs, fixed order
    assert final["eval/rewards/margin"] > 0.1 and final["eval/rewards/accuracy"] >= 0.75, final
    # merged export (HF folder) gives the same logits as the trained LoRA model
    from vlmjax.convert.hf import load_vlm

    merged, cfg2 = load_vlm(tmp_path / "hf")
    ids = np.array([[1, 2, 3] + [cfg2.image_token_id] * cfg2.tokens_per_image + [4, 5]], np.int32)
    px = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype(np.float32)
    rows = np.zeros(1, np.int32)
    np.testing.assert_allclose(np.asarray(merged(ids, px, rows)), np.asarray(s["model"](ids, px, rows)), atol=1e-4)


def test_cli_overrides_and_unknown_keys(data, tmp_path):
    import json
    import subprocess
    import sys

    cfg_file = write_config_file(tmp_path / "cfg.py", data)
    cmd = [sys.executable, "-m", "vlmjax.train", f"--config={cfg_file}", f"--workdir={tmp_path / 'w'}"]
    bad = subprocess.run(cmd + ["--config.optim.nosuch=1"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "optim.nosuch" in bad.stderr and "optim.lr" in bad.stderr
    ok = subprocess.run(cmd + ["--config.train.steps=2", "--config.optim.lr=0.0"], capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout.split("SUMMARY ", 1)[1])
    assert len(summary["history"]) == 2 and summary["history"][1]["lr"] == 0.0


def test_non_finite_loss_stops_and_names_last_good_checkpoint(data, tmp_path):
    from vlmjax.train.loop import NonFiniteLoss

    cfg = tiny_config(data, **{"train.steps": 6, "train.save_every": 2, "optim.lr": 1e12, "optim.clip_norm": 0.0,
                               "optim.schedule": "constant", "optim.warmup_steps": 0})
    with pytest.raises(NonFiniteLoss, match="non-finite loss") as err:
        train(cfg, str(tmp_path))
    assert "params were not updated" in str(err.value)
