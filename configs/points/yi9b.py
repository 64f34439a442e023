"""POINTS (Liu et al., 2024, arXiv:2409.04828) at its published scale: Yi-1.5-9B-Chat + CLIP ViT-L/14-336,
pixel shuffle (4x fewer tokens: 24x24 -> 12x12 = 144 per tile) -> 2-layer MLP, CATTY tiling of up to 8 tiles of
336 px + a global thumbnail (the reference's rule: catty_rule="points").

    python -m vlmjax.train --config configs/points/yi9b.py:pretrain --workdir runs/points/pretrain \\
        --config.model.llm=/ckpt/Yi-1.5-9B-Chat --config.model.vision=/ckpt/clip-vit-large-patch14-336
    python -m vlmjax.train --config configs/points/yi9b.py:sft --workdir runs/points/sft

Substitutions, labelled: POINTS merges a general ViT and an OCR ViT (dual encoder); vlmjax has one tower per VLM
(core-gaps G11), so this is the GENERAL ViT ONLY. Pre-training data is the PPL-filtered pool that
`python -m vlmjax.recipes.points filter select` writes (`kept.jsonl`, caption records), 1M of 5M LAION-5B-en pairs
in the paper. The scorer there is Qwen2-VL-7B (not importable here); `vlmjax.recipes.points.filter.DEFAULT_SCORER`
names the LLaVA-1.5-7B substitute.

Hyper-parameters: the paper's training-setup table could not be consulted offline when this file was written
(no network); the values marked "(verify)" are common LLaVA-style values chosen to be close to what the paper
reports and MUST be checked against arXiv:2409.04828 (Sec. 4 / the hyper-parameter table) before a real run.
"""

from vlmjax.train.defaults import base

STAGES = ("pretrain", "sft")
ROOT = "runs/points"

# CATTY as POINTS runs it: <= 8 tiles + thumbnail (9 tiles max, 9 x 144 = 1296 image tokens per image).
# WePOINTS resizes with PIL resample=2 (bilinear) and squashes the thumbnail to a square ("resize").
IMAGE = dict(tiling="catty", max_tiles=8, thumbnail=True, catty_rule="points", catty_squash_extreme=True,
             resize_mode="resize", resample="bilinear")


def get_config(stage: str = "pretrain"):
    if stage not in STAGES:
        raise ValueError(f"configs/points/yi9b.py:{stage}: stages are {STAGES}")
    c = base()
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.image = dict(IMAGE)
    c.data.seq_len = 4096
    # data.max_images counts image tiles per batch (rows x images x 9 tiles: 8 CATTY tiles + thumbnail, 144 tokens
    # each after pixel shuffle, ~1,300 tokens an image): ~2 instruction samples per 4,096-token packed row
    c.data.max_images = 16 * 2 * 9
    c.optim.warmup_frac = 0.03
    c.optim.schedule = "cosine"
    if stage == "pretrain":
        c.model.init = "assemble"
        c.model.llm = "/path/to/Yi-1.5-9B-Chat"  # HF LlamaForCausalLM folder
        c.model.vision = "/path/to/clip-vit-large-patch14-336"  # general ViT only (no OCR ViT: G11)
        c.model.projector = "pixel_shuffle_mlp"
        c.model.vision_feature_layer = -2
        # Paper Fig. 1: pre-training trains the projector and the general ViT, LLM frozen (verify)
        c.train.trainable = ("^projector/", "^vision/")
        c.optim.lr = 2e-4  # (verify) paper hyper-parameter table, pre-training
        # (verify) global batch 64 per the paper's table; per host here as 16 rows x grad_accum 4: 64 rows in one
        # micro-batch need 61 GiB/device on 8 x 48G (bench/memory.py --config configs/points/yi9b.py:pretrain)
        c.data.batch_size, c.train.grad_accum = 16, 4
        # 16 caption pairs per micro-batch (one per row on average): the ViT trains and keeps its activations, so
        # 3 pairs per row (432 tiles) would need 104 GiB/device on fsdp8 (bench/memory.py --config ...:pretrain
        # --set data.max_images=432); 144 tiles need 46.0
        c.data.max_images = 16 * 9
        # one epoch of 1M filtered pairs (paper Sec. 3.1) at 64 pairs a step (16 x grad_accum 4) = 15,625 steps
        c.train.steps = 15625
        c.data.sources = (dict(format="caption", path=f"{ROOT}/filter/kept.jsonl", image_root="/path/to/laion"),)
        c.data.text = dict(template="plain")
        c.export_dir = f"{ROOT}/pretrain/export"
    else:
        c.model.init = "hf"
        c.model.path = f"{ROOT}/pretrain/export"
        # Paper Fig. 1: instruction tuning trains the projector and the LLM, ViT frozen (verify)
        c.train.trainable = ("^projector/", "^llm/")
        c.optim.lr = 2e-5  # (verify) paper hyper-parameter table, instruction tuning
        c.data.batch_size, c.train.grad_accum = 16, 4  # (verify) 64 per step, as pre-training
        c.train.steps = 20000  # (verify) one epoch of the paper's SFT mix at batch 64
        c.data.sources = (dict(format="llava", path="/path/to/sft.json", image_root="/path/to/sft_images"),)
        c.data.text = dict(template="auto")
        c.export_dir = f"{ROOT}/sft/export"
    return c
