"""The config loader and the training CLI: every key settable, values parsed and validated up front, --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import write_config_file, write_dataset
from vlmjax.train.config_io import apply_overrides, load_config, parse_value, validate

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_sft.py"


def test_values_parse_as_literals_and_dict_calls():
    assert parse_value("(dict(format='llava', path='a.json', image_root='im'),)") == (
        {"format": "llava", "path": "a.json", "image_root": "im"},)
    assert parse_value("2e-5") == 2e-5 and parse_value("('lora_',)") == ("lora_",)
    assert parse_value("/some/path") == "/some/path"  # not a literal: the string itself
    assert parse_value("dict(a=dict(b=1))") == {"a": {"b": 1}}
    assert parse_value("__import__('os')") == "__import__('os')"  # never evaluated


def test_every_section_and_none_default_key_is_settable():
    c = load_config(TINY, ["data.sources=(dict(format='llava', path='x.json', image_root='im'),)",
                           "data.num_epochs=1", "optim.warmup_steps=0", "train.epochs=2", "data.text.loss_on=all",
                           "data.text.system_prompt=Be brief.", "data.image.resize_mode=crop",
                           "data.image.mean=(0.1, 0.2, 0.3)", "data.bad_samples.on_bad_sample=skip",
                           "data.bad_samples.max_skip_fraction=0.2", "optim.lr=1", "model.path=123"])
    assert c.data.sources[0]["path"] == "x.json" and c.data.num_epochs == 1 and c.optim.warmup_steps == 0
    assert c.train.epochs == 2 and c.data.text.loss_on == "all" and c.data.text.system_prompt == "Be brief."
    assert c.data.image.resize_mode == "crop" and c.data.image.mean == (0.1, 0.2, 0.3)
    assert c.data.bad_samples.max_skip_fraction == 0.2 and c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.model.path == "123"  # a string key keeps the raw text


def test_config_files_that_replace_a_section_keep_all_keys(tmp_path):
    f = tmp_path / "c.py"
    f.write_text(f"from vlmjax.train.config_io import load_module\nm = load_module({str(TINY)!r})\n"
                 "def get_config():\n    c = m.get_config()\n    c.data.text = dict(template='chatml')\n    return c\n")
    c = load_config(f, ["data.text.truncation=reject"])
    assert c.data.text.template == "chatml" and c.data.text.truncation == "reject"


def test_bad_keys_values_and_enums_are_reported_up_front():
    with pytest.raises(KeyError, match="optim.lr"):
        load_config(TINY, ["optim.lr_peak=1"])
    with pytest.raises(ValueError, match="train.nan_policy='ignore': allowed values are 'stop', 'skip'"):
        load_config(TINY, ["train.nan_policy=ignore"])
    with pytest.raises(ValueError, match="data.sources\\[0\\]: unknown field"):
        load_config(TINY, ["data.sources=(dict(format='llava', pth='x.json'),)"])
    with pytest.raises(ValueError, match="data.sources\\[0\\].format='webdataset'"):
        load_config(TINY, ["data.sources=(dict(format='webdataset', path='x'),)"])
    with pytest.raises(ValueError, match="is a str, the key holds a int"):
        load_config(TINY, ["train.steps=many"])
    c = load_config(TINY)
    apply_overrides(c, {"data.text.loss_on": "everything", "train.max_consecutive_skips": 0})
    with pytest.raises(ValueError) as e:
        validate(c)
    assert "data.text.loss_on='everything'" in str(e.value) and "train.max_consecutive_skips=0" in str(e.value)


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "vlmjax.train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600, **kw)


def test_help_lists_keys_and_flags():
    out = _cli(["--help"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m vlmjax.train")
    for needle in ("--workdir WORKDIR", "--print_config", "data.num_epochs = None  (int)",
                   "train.nan_policy = 'stop'", "data.text.loss_on = 'assistant'", "train.save_first_step = False"):
        assert needle in out.stdout, needle
    staged = _cli(["--help", "--config", "configs/stic/mini.py:stage1"])
    assert staged.returncode == 0 and "train.objective = 'dpo'" in staged.stdout


def test_cli_bad_enum_fails_before_building(tmp_path):
    out = _cli([f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.nan_policy=ignore"])
    assert out.returncode != 0 and "allowed values are 'stop', 'skip'" in out.stderr
    assert not (tmp_path / "config.json").exists()


def test_cli_sources_override_trains(tmp_path):
    """The README's training command, verbatim, from a folder holding its data (and the repo's configs)."""
    import shlex

    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    (line,) = [x.strip() for x in text.splitlines() if x.strip().startswith("python -m vlmjax.train --config configs/tiny_sft.py")]
    data = write_dataset(tmp_path / "data")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    out = subprocess.run([sys.executable] + shlex.split(line)[1:], capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.split("SUMMARY ", 1)[1])
    assert len(summary["history"]) == 2 and summary["end"] == "steps"
    saved = json.loads((tmp_path / "runs" / "x" / "config.json").read_text())
    assert saved["data"]["sources"][0]["path"] == "data/sft.json" and data["sft"].endswith("data/sft.json")
    assert saved["optim"]["warmup_steps"] == 0 and saved["data"]["num_epochs"] == 1
