"""COINCIDE at the paper's scale (shared/recipes/coincide.md): select 20% of LLaVA-1.5's 665k SFT mix with a
small reference VLM, then train LLaVA-1.5-7B's SFT stage on the subset.

`c.coincide` (read by `python -m vlmjax.recipes.coincide ... --config configs/coincide/llava15_7b.py`):
  reference model: llava-hf/llava-interleave-qwen-0.5b-hf, a SUBSTITUTE for the paper's TinyLLaVA-2.0B
  (SigLIP-so400m + StableLM-2-1.6B, 24 layers, D 2048), which this library cannot import: HF Llava with the same
  SigLIP-so400m tower (729 image tokens, as the paper's) and a Qwen2-layout 0.5B decoder (24 layers, D 1024), so
  the same layer ids 3/7/11/15/19 give 2 x 5 x 1024 = 10,240-dim features (paper: 20,480). K 10,000 for 665k
  samples, 50 iterations, seed 1234, tau 0.1, fraction 0.2.
get_config(): the target's SFT stage on the subset: LLaVA-1.5-7B (Vicuna-7B + CLIP ViT-L/336 + the stage-1
  projector: convert LLaVA's pickled mm_projector.bin outside this library, we never unpickle, or run our own
  align stage first), LoRA r128/a256 on every LLM linear, lr 2e-4, projector lr 2e-5, 1 epoch, global batch 128,
  cosine, warmup 3%, no weight decay, max length 2048.
"""

from vlmjax.train.defaults import LLAMA_LINEAR, base
from ml_collections import ConfigDict

POOL = 665_298  # llava_v1_5_mix665k.json
FRACTION = 0.2
GLOBAL_BATCH = 128


def get_config():
    c = base()
    c.coincide = ConfigDict(dict(
        model="llava-hf/llava-interleave-qwen-0.5b-hf",  # substitute for TinyLLaVA-2.0B (module docstring)
        substitute_for="TinyLLaVA-2.0B (SigLIP-so400m + StableLM-2-1.6B)",
        layers=(3, 7, 11, 15, 19), k=10_000, iters=50, seed=1234, tau=0.1, fraction=FRACTION,
        dtype="float16"))
    c.model.init = "hf"
    c.model.path = "/path/to/llava-1.5-7b-stage1"  # Vicuna-7B-v1.5 + CLIP-L/336 + the converted stage-1 projector
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.update(rank=128, alpha=256.0, dropout=0.05, targets=LLAMA_LINEAR)
    c.train.trainable = ("lora_", "^projector/")
    c.train.save_trainable = True
    c.optim.lr = 2e-4
    c.optim.groups = (dict(pattern="^projector/", lr=2e-5),)
    c.optim.weight_decay = 0.0
    c.optim.warmup_frac = 0.03
    c.optim.schedule = "cosine"
    c.data.text = dict(template="vicuna_v1")
    c.data.seq_len = 2048
    c.data.pack = False  # one sample per row, as LLaVA trains, so an epoch is a known number of steps
    c.data.max_images = 16  # image tiles per batch (not per row): one per row, as every LLaVA-665k sample has <= 1
    # Global batch = hosts x data.batch_size x train.grad_accum = 128 (one host: 16 x 8; 8 hosts: 16 x 1).
    c.data.batch_size = 16
    c.train.grad_accum = 8
    # 1 epoch: the training config has no epoch count, so steps = ceil(subset / global batch); subset =
    # floor(0.2 x 665,298 + 0.5) = 133,060 -> 1,040 steps (the last batch takes 60 samples of a second pass).
    subset = int(POOL * FRACTION + 0.5)
    c.train.steps = -(-subset // GLOBAL_BATCH)
    c.train.save_every = 200
    c.data.sources = (dict(format="llava", path="runs/coincide/select/llava_v1_5_mix665k.json",
                           image_root="/path/to/llava/images"),)
    c.export_dir = "runs/coincide/sft/export"
    return c
