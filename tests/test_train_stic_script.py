"""scripts/stic.sh runs as written (its train command lines, with their `--config.data.sources=(dict(...),)`
overrides, on configs/stic/llava15_7b.py) on a tiny random LLaVA and three images: extra --config flags shrink
the model's stages, STIC_GEN_ARGS the generation steps."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import write_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_stic_script_runs_every_stage(tmp_path):
    from vlmjax.train.config_io import load_config
    from vlmjax.train.loop import export
    from vlmjax.train.setup import build_model

    data = write_dataset(tmp_path / "d", n=3)
    # two text-only samples: make_infused_sft keeps them as they are, so stage 2 has data whatever the random
    # model describes (its empty/whitespace descriptions are left out and counted)
    sft = json.loads(Path(data["sft"]).read_text()) + [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
        for i in range(2)]
    (tmp_path / "d" / "sft_mixed.json").write_text(json.dumps(sft))
    model, _, tok = build_model(load_config(REPO / "configs" / "tiny_sft.py").model)
    export(model, str(tmp_path / "llava"), tok)
    shrink = ["--config.model.dtype=float32", "--config.model.remat=none", "--config.lora.rank=4",
              "--config.lora.alpha=8.0", "--config.train.steps=2", "--config.train.grad_accum=1",
              "--config.data.seq_len=320", "--config.optim.warmup_steps=0"]
    env = dict(os.environ, PYTHON=sys.executable, STIC_TEMPLATE="chatml", PYTHONPATH=str(REPO),
               STIC_GEN_ARGS="--max-new-tokens 4 --batch-size 2 --dtype float32", VLMJAX_NO_REEXEC="1")
    w = tmp_path / "w"
    out = subprocess.run(["bash", str(REPO / "scripts" / "stic.sh"), str(tmp_path / "llava"), data["images"],
                          str(tmp_path / "d" / "sft_mixed.json"), data["images"], str(w), *shrink], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    assert "STIC model:" in out.stdout
    s1 = json.loads((w / "stage1" / "config.json").read_text())
    assert s1["data"]["sources"][0] == {**s1["data"]["sources"][0], "format": "preference",
                                         "path": f"{w}/pairs.jsonl", "image_root": data["images"]}
    assert s1["train"]["objective"] == "dpo" and s1["lora"]["rank"] == 4
    s2 = json.loads((w / "stage2" / "config.json").read_text())
    assert s2["data"]["sources"][0]["path"] == f"{w}/infused.json"
    assert s2["model"]["load_params"] == f"{w}/stage1/trainable.safetensors"
    assert (w / "stage2" / "export" / "config.json").exists()
    assert json.loads(out.stdout.split("SUMMARY ")[-1].splitlines()[0])["end"] == "steps"
    shutil.rmtree(tmp_path / "llava")
