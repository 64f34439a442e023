"""VILA stage 3: supervised fine-tuning on visual instruction data (LLaVA-style conversations), ViT frozen.

    python -m vlmjax.train --config configs/vila/stage3_sft.py --workdir runs/vila/sft

Starts from stage 2's export and writes the final model to runs/vila/sft/export (native or HF, as stage 1).
Blending text-only instruction data (VILA's FLAN) by epoch is not expressible yet (issue 15, item 5).
"""

from vlmjax.train.defaults import base, sibling_config

ROOT = sibling_config(__file__, "stage1_align.py").ROOT


def get_config():
    c = base()
    c.model.init = "checkpoint"
    c.model.path = f"{ROOT}/pretrain/export"  # stage 2's export
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.train.trainable = ("^projector/", "^llm/")
    c.train.steps = 5200  # ~1 epoch of llava_v1_5_mix665k at global batch 128
    c.optim.lr = 2e-5
    c.data.sources = (dict(format="llava", path="data/llava_v1_5_mix665k.json", image_root="data/images"),)
    c.data.text = dict(template="vicuna_v1")
    c.data.batch_size = 16
    c.data.seq_len = 2048
    c.data.max_images = 32
    c.export_dir = f"{ROOT}/sft/export"
    return c
