"""The library's stage runner (vlmjax.train.stages): config loading, dotted overrides, one CI-sized stage trained
for real, and skip-if-exported (a rerun trains nothing)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train_utils import TINY_MINI
from vlmjax.train import stages

REPO = Path(__file__).resolve().parents[1]
MINI = REPO / "configs" / "mini" / "base.py"
V = "model.vlm.vision."
TINY = TINY_MINI


def test_load_config_names_a_missing_file_and_a_missing_get_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.py"):
        stages.stage_config(tmp_path / "nope.py", "align")
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match="empty.py defines no get_config"):
        stages.stage_config(tmp_path / "empty.py", "align")
    assert stages.stage_config(MINI, "align").model.init == "random"
    with pytest.raises(ValueError, match="stages are"):
        stages.stage_config(MINI, "nope")


def test_overrides_set_nested_dotted_keys_and_name_unknown_ones():
    c = stages.apply_overrides(stages.stage_config(MINI, "align"), {"optim.lr": 0.5, V + "patch_size": 8})
    assert c.optim.lr == 0.5 and c.model.vlm.vision.patch_size == 8
    with pytest.raises(KeyError, match="unknown config key 'optim.lrr'"):
        stages.apply_overrides(c, {"optim.lrr": 1.0})
    with pytest.raises(KeyError, match="unknown config key 'model.vlm.visoin.patch_size'"):
        stages.apply_overrides(c, {"model.vlm.visoin.patch_size": 1})


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    from vlmjax.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("stage_data")
    (root / "images").mkdir()
    rows = []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 3):
        Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(root / "images" / f"{i}.png")
        rows.append({"id": f"c{i}", "image": f"{i}.png", "caption": f"A {name} square."})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer([r["caption"] for r in rows] * 4 + ["user", "assistant", "system"], root / "tokenizer",
                    vocab_size=300)
    return root


@pytest.mark.slow
def test_train_stage_applies_overrides_then_skips_when_exported(caption_data, tmp_path, monkeypatch):
    work = tmp_path / "align"
    export = stages.train_stage("align", work, config_file=MINI, image_root=str(caption_data / "images"),
                                source=str(caption_data / "captions.jsonl"), tokenizer=str(caption_data / "tokenizer"),
                                steps_scale=1e-3, over={**TINY, "optim.lr": 1e-3}, quiet=True)
    # the mini config's conv patch stem has no HF form: the stage exports a native folder (and a rerun finds it)
    assert (export / "vlmjax_config.json").exists() and (export / "model.safetensors").exists()
    used = json.loads((work / "config.json").read_text())
    assert used["train"]["steps"] == 2  # scaled to the floor of 2
    assert used["optim"]["lr"] == 1e-3 and used["model"]["vlm"]["vision"]["hidden_size"] == 16
    assert used["data"]["sources"][0]["path"] == str(caption_data / "captions.jsonl")
    assert used["model"]["tokenizer"] == str(caption_data / "tokenizer")
    log = json.loads((work / "stage.json").read_text())
    assert log["steps"] == 2 and len(log["losses"]) == 2 and log["cpu_seconds"] > 0

    import vlmjax.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("an exported stage was trained again"))
    again = stages.train_stage("align", work, config_file=MINI, image_root="/nonexistent", over={"optim.lr": 9.0})
    assert again == export and json.loads((work / "stage.json").read_text()) == log
