"""VILA stage 1 / LLaVA pretrain: projector alignment on caption pairs ("plain" format), ViT and LLM frozen.

    python -m vlmjax.train --config configs/vila/stage1_align.py --workdir runs/vila/align \
        --config.model.llm=/ckpt/vicuna-7b-v1.5 --config.model.vision=/ckpt/clip-vit-large-patch14-336 \
        --config.data.sources="(dict(format='caption', path='chat.json', image_root='images'),)"  # or edit DATA

Writes its model to runs/vila/align/export (`export_dir`), which stage 2 (configs/vila/stage2_pretrain.py) starts
from. With the `linear` or `downsample2x2_mlp` projector HF LLaVA cannot hold it, so the export is a native folder
(train.export_format="auto"); mlp2x_gelu exports as an HF LLaVA folder. Stage 2 reads either (model.init=checkpoint).
"""

from vlmjax.train.defaults import base

ROOT = "runs/vila"
DATA = (dict(format="caption", path="data/LLaVA-CC3M-Pretrain-595K/chat.json", image_root="data/LLaVA-CC3M-Pretrain-595K/images"),)


def get_config():
    c = base()
    c.model.init = "assemble"
    c.model.llm = "/path/to/llm"  # HF *ForCausalLM folder or .gguf
    c.model.vision = "/path/to/clip-vit-large-patch14-336"
    c.model.projector = "linear"  # VILA's best; VILA-1.5: "downsample2x2_mlp"; LLaVA-1.5: "mlp2x_gelu"
    c.model.dtype = "bfloat16"
    c.train.trainable = ("^projector/",)
    c.train.steps = 2400  # 1 epoch of 595k at global batch 256 (~2325 steps)
    c.optim.lr = 1e-3
    c.optim.warmup_frac = 0.03
    c.data.sources = DATA
    c.data.text = dict(template="plain")
    c.data.batch_size = 32  # per host; global batch = hosts x batch_size x grad_accum
    c.data.seq_len = 2048
    c.data.max_images = 64
    c.model.remat = "full"
    c.export_dir = f"{ROOT}/align/export"
    return c
