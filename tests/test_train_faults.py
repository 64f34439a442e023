"""Faults never lose work: non-finite runs, the end of the data, corrupted checkpoints, reruns of a workdir,
replayed steps, skipped samples. Tiny random VLM, tiny on-disk data."""

import json
import logging

import numpy as np
import pytest

from train_utils import tiny_config, write_dataset
from vlmjax.train.loop import NonFiniteLoss, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def strict_rows(path):
    def no_constants(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text().splitlines()]


def steps_on_disk(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_nan_skip_is_bounded_and_never_saves_a_broken_state(data, tmp_path):
    cfg = tiny_config(data, **{"train.steps": 20, "train.save_every": 1, "train.keep_checkpoints": 1,
                               "optim.lr": 1e9, "optim.schedule": "constant", "optim.warmup_steps": 0,
                               "train.nan_policy": "skip", "train.max_consecutive_skips": 3})
    with pytest.raises(NonFiniteLoss, match="3 non-finite steps in a row") as err:
        train(cfg, str(tmp_path))
    assert "train.max_consecutive_skips=3" in str(err.value)
    rows = strict_rows(tmp_path / "metrics.jsonl")
    bad = [r for r in rows if r.get("nonfinite")]
    assert len(bad) == 3 and all(r["loss"] is None and "loss" in r["nonfinite"] for r in bad)
    last_finite = max(r["step"] for r in rows if not r.get("nonfinite"))
    # retention (keep 1) still holds a checkpoint, from a finite step, with finite parameters
    kept = steps_on_disk(tmp_path)
    assert kept and kept[-1] <= last_finite
    from vlmjax.train.checkpoint import Checkpointer
    import orbax.checkpoint as ocp

    mgr = Checkpointer(str(tmp_path / "checkpoints"), save_every=1, keep=10).manager
    state = mgr.restore(kept[-1], args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    import jax

    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_epochs_end_at_the_end_of_the_data_with_a_checkpoint_and_export(tmp_path):
    data = write_dataset(tmp_path / "d", n=7)  # 7 samples, batch 2: 3 full batches + 1 partial
    cfg = tiny_config(data, **{"train.epochs": 1, "train.steps": 1000, "data.pack": False, "train.save_every": 100,
                               "export_dir": str(tmp_path / "export")})
    s = train(cfg, str(tmp_path / "w"))
    assert s["end"] == "data" and s["steps"] == 4 and s["last_step"] == 4 and s["last_checkpoint"] == 4
    assert steps_on_disk(tmp_path / "w") == [4] and (tmp_path / "export" / "config.json").exists()
    assert s["samples_seen"] == 7 and s["wall_s"] > 0
    # non-padding tokens, counted independently from the data pipeline's own batches
    from vlmjax.data import make_iterator
    from vlmjax.train.setup import build_model, data_config

    _, vcfg, tok = build_model(cfg.model)
    dc = data_config(cfg.data, vcfg, tok, mode="sft", seed=0)
    import dataclasses

    with make_iterator(dataclasses.replace(dc, num_epochs=1), tok) as it:
        tokens = sum(int((b["segment_ids"] > 0).sum()) for b in it)
    assert s["tokens_seen"] == tokens


def test_running_out_of_data_ends_cleanly_with_grad_accum(tmp_path, caplog):
    data = write_dataset(tmp_path / "d", n=5)  # batches 2, 2, 1 -> steps of 2 micro-batches: 2 + (1 + padding)
    cfg = tiny_config(data, **{"data.num_epochs": 1, "train.steps": 20, "data.pack": False, "train.grad_accum": 2,
                               "train.save_every": 100})
    with caplog.at_level(logging.INFO, logger="vlmjax.train.loop"):
        s = train(cfg, str(tmp_path / "w"))
    assert s["end"] == "data" and s["last_step"] == 2 and steps_on_disk(tmp_path / "w") == [2]
    assert all(np.isfinite(h["loss"]) for h in s["history"]) and s["samples_seen"] == 5
    assert "end of the data after step 2" in caplog.text


def test_blend_epoch_is_one_pass_over_the_defining_source(data):
    from vlmjax.data import DataConfig, SourceSpec, TextSpec, make_iterator
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.data.image import ImageSpec

    text_only = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"Count to {i}."},
                                                    {"from": "gpt", "value": " ".join(map(str, range(i + 1)))}]}
                 for i in range(3)]
    visual = SourceSpec(format="llava", path=data["sft"], image_root=data["images"], defines_epoch=True)
    text = SourceSpec(format="llava", records=text_only, weight=0.5)
    cfg = DataConfig(sources=(visual, text), batch_size=1, seq_len=96, max_images=2, pack=False, num_epochs=2,
                     image=ImageSpec(image_size=32, tokens_per_image=16), text=TextSpec(template="chatml"))
    with make_iterator(cfg, smollm2_tokenizer()) as it:
        assert it.records == 2 * (8 + 4)
        ids = []
        for _ in it:
            ids += [i for i in it.last_ids if i]
    epochs = [ids[:12], ids[12:]]
    assert len(ids) == 24
    for ep in epochs:  # each epoch: every visual sample once, 8 * 0.5 = 4 text samples, cycling the 3 text records
        assert sorted(i for i in ep if i.startswith("s")) == sorted(f"s{i}" for i in range(8))
        assert sum(i.startswith("t") for i in ep) == 4
    assert {i for i in ids if i.startswith("t")} == {"t0", "t1", "t2"}
    first_half = ids[:6]  # interleaved, not appended: the ratio holds within the epoch
    assert 1 <= sum(i.startswith("t") for i in first_half) <= 3


def test_corrupted_latest_checkpoint_falls_back_and_replayed_steps_are_logged_once(data, tmp_path, caplog):
    over = {"train.steps": 6, "train.save_every": 2, "train.keep_checkpoints": 3}
    first = train(tiny_config(data, **over), str(tmp_path), stop_at=5)  # steps 1-5 logged, checkpoints 2, 4
    assert steps_on_disk(tmp_path) == [2, 4]
    (tmp_path / "checkpoints" / "4" / "_CHECKPOINT_METADATA").unlink()
    for p in (tmp_path / "checkpoints" / "4").rglob("manifest.ocdbt"):
        p.unlink()
    with caplog.at_level(logging.WARNING):
        s = train(tiny_config(data, **over), str(tmp_path))
    assert s["start"] == 2 and s["last_step"] == 6 and s["end"] == "steps"
    warn = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warn and "[4]" in warn[0] and "step 2" in warn[0], caplog.text
    assert (tmp_path / "checkpoints.corrupt" / "4").exists()  # set aside, not deleted
    # the replay of steps 3-4 reproduces them exactly (same batches, same RNG)
    np.testing.assert_allclose([h["loss"] for h in s["history"][:3]], [h["loss"] for h in first["history"][2:5]],
                               rtol=1e-6)
    # metrics.jsonl holds each step once although steps 3-5 ran twice; TensorBoard gets a purge marker at step 3
    rows = strict_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    from tensorboardX.proto import event_pb2

    purges = []
    for f in (tmp_path / "tb").iterdir():
        raw, pos = f.read_bytes(), 0
        while pos < len(raw):  # TFRecord: length (8), crc (4), event, crc (4)
            n = int.from_bytes(raw[pos:pos + 8], "little")
            ev = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                purges.append(ev.step)
    assert 3 in purges, purges


def test_rerun_with_another_config_refuses(data, tmp_path):
    from vlmjax.train.workdir import ConfigMismatch

    over = {"train.steps": 2, "train.save_every": 100}
    train(tiny_config(data, **over), str(tmp_path))
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(ConfigMismatch, match="optim.lr: 0.003 in .*config.json, 0.5 now"):
        train(tiny_config(data, **over, **{"optim.lr": 0.5}), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before
    again = train(tiny_config(data, **{**over, "train.save_every": 50}), str(tmp_path))  # bookkeeping may change
    assert again["start"] == 2 and again["history"] == []


def test_skips_are_summarised_counted_and_capped_on_short_runs(tmp_path, caplog):
    from vlmjax.data.errors import TooManySkipped

    data = write_dataset(tmp_path / "d", n=8)
    (tmp_path / "d" / "images" / "3.png").unlink()
    over = {"data.num_epochs": 1, "train.epochs": 1, "data.pack": False, "train.save_every": 100,
            "data.bad_samples.on_bad_sample": "skip", "export_dir": str(tmp_path / "export")}
    with pytest.raises(TooManySkipped, match="1 of 8 samples skipped"):  # 12.5% > 1%, although 8 < min_samples
        train(tiny_config(data, **over), str(tmp_path / "a"))
    assert not (tmp_path / "export").exists() and steps_on_disk(tmp_path / "a")  # work kept, nothing exported
    with caplog.at_level(logging.WARNING):
        s = train(tiny_config(data, **over, **{"data.bad_samples.max_skip_fraction": 0.2}), str(tmp_path / "b"))
    assert s["skipped"] == {"missing_image": 1} and s["samples_seen"] == 7
    assert any("skipped 1 of 8 samples" in r.getMessage() and "missing_image" in r.getMessage()
               for r in caplog.records)
    rows = strict_rows(tmp_path / "b" / "metrics.jsonl")
    assert rows[-1]["data/skipped/missing_image"] == 1 and rows[-1]["data/samples"] == 7


def test_initial_save_only_when_asked(data, tmp_path):
    # default off: see the epochs test, whose only checkpoint is the last step
    train(tiny_config(data, **{"train.steps": 3, "train.save_every": 10, "train.save_first_step": True}),
          str(tmp_path))
    assert steps_on_disk(tmp_path) == [1, 3]
