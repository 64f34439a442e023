"""STIC on LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf, imported from HF), the paper's settings (shared/recipes/stic.md).

    scripts/stic.sh MODEL_DIR UNLABELED_IMAGES SFT_JSON SFT_IMAGES WORKDIR       # all stages
    python -m vlmjax.train --config configs/stic/llava15_7b.py:stage1 --workdir W/stage1 \\
        --config.model.path=MODEL_DIR --config.data.sources="(dict(format='preference', path='W/pairs.jsonl', image_root='IMAGES'),)"

stage1: DPO with alpha x NLL of chosen (beta 0.1, alpha 1/1024), LoRA r=128 alpha=256 dropout 0.05 on every LLM linear,
  reference = the same weights with the adapter off; LoRA lr 1e-7, projector lr 2e-5; 1 epoch of 6k pairs at global
  batch 8 (750 steps); cosine, warmup 3%, no weight decay; bf16 compute, fp32 master weights.
stage2: description-infused SFT continuing the stage-1 adapter (`model.load_params` = stage 1's trainable.safetensors),
  lr 2e-5, 1 epoch of 5k samples at global batch 8 (625 steps), max length 2048.
Global batch = hosts x data.batch_size x train.grad_accum: 8 here on one host (batch 1 x grad_accum 8 fits a 48 GB
GPU with remat); on 8 devices set data.batch_size=8, train.grad_accum=1.
"""

from vlmjax.train.defaults import LLAMA_LINEAR, base

STAGES = ("stage1", "stage2")


def get_config(stage: str = "stage1"):
    if stage not in STAGES:
        raise ValueError(f"configs/stic/llava15_7b.py:{stage}: stages are {STAGES}")
    c = base()
    c.model.init = "hf"
    c.model.path = "/path/to/llava-1.5-7b-hf"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.update(rank=128, alpha=256.0, dropout=0.05, targets=LLAMA_LINEAR)
    c.train.trainable = ("lora_", "^projector/")
    c.train.save_trainable = True
    c.optim.weight_decay = 0.0
    c.optim.warmup_frac = 0.03
    c.optim.schedule = "cosine"
    c.data.text = dict(template="vicuna_v1")
    c.data.batch_size = 1
    c.train.grad_accum = 8
    c.data.seq_len = 2048
    c.data.max_images = 2
    if stage == "stage1":
        c.train.objective = "dpo"
        c.train.steps = 750  # 6k pairs / global batch 8
        c.optim.lr = 1e-7
        c.optim.groups = (dict(pattern="^projector/", lr=2e-5),)
        c.dpo.update(loss="stic", beta=0.1, alpha=1.0 / 1024, reference="lora_off")
        c.data.pack = False
        c.data.sources = (dict(format="preference", path="runs/stic/pairs.jsonl", image_root="/path/to/coco/train2014"),)
    else:
        c.model.load_params = "runs/stic/stage1/trainable.safetensors"
        c.train.steps = 625  # 5k samples / global batch 8
        c.optim.lr = 2e-5
        c.data.sources = (dict(format="llava", path="runs/stic/infused.json", image_root="/path/to/llava/images"),)
        c.export_dir = "runs/stic/stage2/export"
    return c
