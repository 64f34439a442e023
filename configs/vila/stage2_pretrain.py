"""VILA stage 2: pre-training with the LLM UNFROZEN (ViT frozen) on interleaved documents + caption pairs.

    python -m vlmjax.train --config configs/vila/stage2_pretrain.py --workdir runs/vila/pretrain

Starts from stage 1's export (native or HF folder, told apart by its config file) and writes its own for stage 3.
"""

from vlmjax.train.defaults import base, sibling_config

ROOT = sibling_config(__file__, "stage1_align.py").ROOT


def get_config():
    c = base()
    c.model.init = "checkpoint"
    c.model.path = f"{ROOT}/align/export"  # stage 1's export
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.train.trainable = ("^projector/", "^llm/")
    c.train.steps = 10000
    c.optim.lr = 5e-5
    c.data.sources = (
        dict(format="interleaved", path="data/mmc4/docs.jsonl", image_root="data/mmc4/images", weight=1.0,
             format_options=dict(max_images=6)),
        dict(format="caption", path="data/coyo/pairs.jsonl", image_root="data/coyo/shards/*.tar", weight=1.0),
    )
    c.data.text = dict(template="plain", loss_on="all")
    c.data.batch_size = 16
    c.data.seq_len = 4096
    c.data.max_images = 96
    c.export_dir = f"{ROOT}/pretrain/export"
    return c
