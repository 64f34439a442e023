"""The VILA stage chain (align -> pretrain -> sft) from configs/vila/llama2_7b.py with tiny models: each stage writes the
export the next one reads (native for `linear` / `downsample2x2_mlp`, which HF LLaVA cannot hold), the preprocessing
the first stage records travels with the model, and the generate CLI reads the final native folder."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from train_utils import write_dataset
from vlmjax.convert.native import folder_kind, load_native
from vlmjax.train import stages
from vlmjax.train.loop import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vila"
TINY_VLM = dict(
    llm=dict(vocab_size=49216, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             tie_word_embeddings=True, eos_token_id=2, bos_token_id=1),
    vision=dict(kind="siglip", image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                num_heads=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
    vision_feature_select="full")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vila_data")
    d = write_dataset(root)
    sft = json.loads(Path(d["sft"]).read_text())
    caps = [{"id": f"c{i}", "image": r["image"], "caption": r["conversations"][1]["value"]} for i, r in enumerate(sft)]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(c) for c in caps))
    docs = [{"id": f"d{i}", "text_list": ["A picture.", r["conversations"][1]["value"], "The end."],
             "image_info": [{"image_name": r["image"], "matched_text_index": 1}]} for i, r in enumerate(sft)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps(x) for x in docs))
    return {**d, "captions": str(root / "captions.jsonl"), "docs": str(root / "docs.jsonl")}


STAGES = {"stage1_align": "align", "stage2_pretrain": "pretrain", "stage3_sft": "sft"}


def stage_config(name: str, root: Path, sources, **over):
    c = stages.stage_config(CONFIGS / "llama2_7b.py", STAGES[name])
    c.model.dtype, c.model.remat = "float32", "none"
    c.train.steps, c.train.save_every, c.optim.schedule = 1, 100, "constant"
    c.data.batch_size, c.data.seq_len, c.data.max_images = 2, 96, 8
    c.data.sources = sources
    c.export_dir = c.export_dir.replace("runs/vila", str(root))
    if c.model.init == "checkpoint":
        c.model.path = c.model.path.replace("runs/vila", str(root))
    for k, v in over.items():
        node, parts = c, k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return c


def params(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _align(data, tmp_path, projector, image):
    """Stage 1 from a random model: its export is native and reloads as trained, with the run's preprocessing."""
    caption = dict(format="caption", path=data["captions"], image_root=data["images"])
    s1 = train(stage_config("stage1_align", tmp_path, (caption,), **{
        "model.init": "random", "model.vlm": {**TINY_VLM, "projector": projector}, "model.tokenizer": "smollm2",
        "data.image": image}), str(tmp_path / "w1"))
    export1 = tmp_path / "align" / "export"
    assert s1["export_format"] == "native" and folder_kind(export1) == "native"
    loaded, cfg1 = load_native(export1)
    assert cfg1.projector == projector and cfg1.image_tiling == image.get("tiling", "none")
    trained = params(s1["model"])
    assert all(np.array_equal(v, trained[k]) for k, v in params(loaded).items())
    return caption, cfg1


def test_linear_projector_align_exports_native(data, tmp_path):
    """`linear` (which HF LLaVA cannot hold) takes the native path; the rest of the chain is the projector-agnostic
    plumbing the downsample chain below runs."""
    _align(data, tmp_path, "linear", {})


@pytest.mark.slow
def test_align_pretrain_sft_chain(data, tmp_path):
    caption, cfg1 = _align(data, tmp_path, "downsample2x2_mlp", {"tiling": "catty", "max_tiles": 2})
    interleaved = dict(format="interleaved", path=data["docs"], image_root=data["images"])
    s2 = train(stage_config("stage2_pretrain", tmp_path, (interleaved, caption)), str(tmp_path / "w2"))
    assert s2["config"].image_tiling == cfg1.image_tiling == "catty"  # the model's preprocessing, not a default
    llava = dict(format="llava", path=data["sft"], image_root=data["images"])
    s3 = train(stage_config("stage3_sft", tmp_path, (llava,)), str(tmp_path / "w3"))
    final = tmp_path / "sft" / "export"
    assert s3["export_format"] == "native" and load_native(final)[1] == s3["config"]

    from vlmjax.generate.__main__ import main as generate_main

    out = tmp_path / "gen.jsonl"
    assert generate_main(["--model", str(final), "--data", data["sft"], "--image-folder", data["images"],
                          "--out", str(out), "--limit", "2", "--max-new-tokens", "2", "--batch-size", "2"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_unexportable_model_fails_before_step_one(data, tmp_path):
    caption = dict(format="caption", path=data["captions"], image_root=data["images"])
    c = stage_config("stage1_align", tmp_path, (caption,), **{
        "model.init": "random", "model.vlm": {**TINY_VLM, "projector": "downsample2x2_mlp"},
        "model.tokenizer": "smollm2", "train.export_format": "hf"})
    from vlmjax.convert.hf_config import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="'downsample2x2_mlp' cannot be exported"):
        train(c, str(tmp_path / "w"))
    ckpts = tmp_path / "w" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())  # nothing trained, nothing saved


def test_train_config_disagreeing_with_the_loaded_model_is_an_error(data, tmp_path):
    from vlmjax.convert.native import save_native
    from vlmjax.models import VLM
    from vlmjax.train.setup import build_model, data_config

    c = stage_config("stage1_align", tmp_path, (), **{
        "model.init": "random", "model.vlm": {**TINY_VLM, "projector": "linear"}, "model.tokenizer": "smollm2"})
    model, cfg, tok = build_model(c.model, image={"tiling": "catty"})
    assert cfg.image_tiling == "catty" and model.cfg == cfg  # a fresh model records the run's preprocessing
    save_native(model, tmp_path / "m", tokenizer=tok)
    c2 = stage_config("stage2_pretrain", tmp_path, (dict(format="caption", path=data["captions"]),), **{
        "model.path": str(tmp_path / "m"), "data.image": {"tiling": "none"}})
    loaded, cfg2, tok2 = build_model(c2.model, image=c2.data.image)
    assert isinstance(loaded, VLM) and cfg2.image_tiling == "catty"
    with pytest.raises(ValueError, match="tiling='none' disagrees with the model, whose config records "
                                         "image_tiling='catty'"):
        data_config(c2.data, cfg2, tok2, mode="sft", seed=0)
