"""STIC stage 1b: DPO with the alpha * NLL regulariser on self-constructed pairs (shared/recipes/stic.md).

LoRA r=128, alpha=256, dropout 0.05 on every linear layer of the LLM; the reference is the same weights with the
adapter off. LoRA lr 1e-7, projector lr 2e-5; 1 epoch; global batch 8; cosine, warmup 3%, no weight decay.
"""

from vlmjax.train.defaults import LLAMA_LINEAR, base


def get_config():
    c = base()
    c.model.init = "hf"
    c.model.path = "/path/to/llava-1.5-7b-hf"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.lora.update(rank=128, alpha=256.0, dropout=0.05, targets=LLAMA_LINEAR)
    c.train.objective = "dpo"
    c.train.trainable = ["lora_", "^projector/"]
    c.train.steps = 750  # 6k pairs / global batch 8
    c.optim.lr = 1e-7
    c.optim.groups = [dict(pattern="^projector/", lr=2e-5)]
    c.optim.weight_decay = 0.0
    c.optim.warmup_frac = 0.03
    c.dpo.update(loss="stic", beta=0.1, alpha=1.0 / 1024, reference="lora_off")
    c.data.sources = [dict(format="preference", path="runs/stic/pairs.jsonl", image_root="/path/to/coco/train2014")]
    c.data.pack = False
    c.data.batch_size = 8
    c.data.seq_len = 2048
    c.data.max_images = 16
    return c
