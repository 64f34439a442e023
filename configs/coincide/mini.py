"""COINCIDE reproduced in miniature (`python -m vlmjax.recipes.coincide.miniature`): the SFT stages that start from
the shared mini base (configs/mini/base.py's sft export; the runner sets the model, data and image paths).

Stages (the argument after the colon):
  reference  the base briefly SFT'd on single-turn questions of images 3000-3499: the small reference VLM whose
             attention outputs COINCIDE clusters;
  sft        one epoch on an arm's subset of the pool (single-turn questions of images 0-1999).
Both are the base's own SFT stage (tower frozen, lr 2e-3, cosine to 0.1 x, AdamW b2 0.95) with packing made
token-bound: a single-turn sample is ~35 tokens, so 16 rows of 256 hold ~7 samples each and 160 image slots never
bind first (the base's 32 would cap a batch at 2 samples per row). One pass over the data (`data.num_epochs=1`);
the runner sets `train.steps` to the packed batch count, so the schedule spans the epoch.
"""

from vlmjax.train.config_io import sibling_config

_base = sibling_config(__file__, "../mini/base.py")

STAGES = ("reference", "sft")
MAX_IMAGES = 160  # image slots per batch: 16 rows x ~7 samples + room; tokens, not images, bound a batch


def get_config(stage: str = "sft"):
    if stage not in STAGES:
        raise ValueError(f"configs/coincide/mini.py:{stage}: stages are {STAGES}")
    c = _base.get_config("sft")
    c.data.max_images = MAX_IMAGES
    c.data.num_epochs = 1
    c.train.save_every = 1000  # short stages: one checkpoint at the end
    c.data.sources = (dict(format="llava", path="runs/coincide_mini/data/pool.json", image_root="images"),)
    c.export_dir = f"runs/coincide_mini/{stage}/export"
    return c
