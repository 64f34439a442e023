"""VILA^2 at real scale (Fang et al. 2024; shared/recipes/vila2.md), Llama-2-7B: VILA's three stages
(configs/vila/llama2_7b.py, imported: model, data, lr, batch, steps as VILA's) retrained from scratch every round;
the round's captions replace only the pretrain stage's share of COYO pairs that VILA^2 recaptions, the paper's 5%.

    python -m vlmjax.recipes.vila2 subset --data data/coyo/pairs.jsonl --fraction 0.05 \\
        --out data/coyo/pairs.vila2_subset.jsonl --rest data/coyo/pairs.vila2_rest.jsonl
    python -m vlmjax.recipes.vila2 loop --rounds 3 --config configs/vila2/llama2_7b.py \\
        --stages align pretrain sft --caption-stages pretrain --caption-source vila2_subset \\
        --captions data/coyo/pairs.vila2_subset.jsonl --image-root data/coyo/images \\
        --source align=data/LLaVA-CC3M-Pretrain-595K/chat.json --source sft=data/llava/llava_v1_5_mix665k.json \\
        --out runs/vila2 --set align:model.llm=/ckpt/Llama-2-7b-hf \\
        --set align:model.vision=/ckpt/clip-vit-large-patch14-336

(the loop reads RECAPTION below for its prompts, max_new_tokens and temperature). COYO's pairs are split by
`vila2.subset` (SUBSET_FRACTION, a SHA-256 of each id: the same subset on every host and in every round) into
"vila2_subset" (recaptioned: round k trains on original + VILA^{k-1}'s recaption) and "vila2_rest" (original
captions in every round), weighted by their shares of the pairs, so round 0 draws VILA's blend (MMC4 docs : pairs =
1 : 1, each pair equally likely) and every round the same samples, steps and schedule.

specialist: a specialist fine-tunes VILA^k's SFT export (`specialist train --model round{k}/sft/export`) on its
domain data (llava format: spatial relations, grounding with [xmin, ymin, xmax, ymax] boxes in 0-1, OCR) with
VILA's SFT settings (LLM + projector, lr 2e-5, global batch 128, vicuna_v1); `specialist train --epochs 1` sets the
steps to one epoch of the domain file (SPECIALIST_SAMPLES is only the default). Its answers about the subset's
images (`specialist recaption`, prompts.SPECIALIST_PROMPTS) are appended as QA turns (`append`), and the generalist
retrains on them: `loop --rounds 0 --captions runs/vila2/appended.r{k}.jsonl --caption-format caption_qa ...`.
"""

from vlmjax.recipes.vila2.prompts import PROMPTS
from vlmjax.train.config_io import sibling_config

VILA = sibling_config(__file__, "../vila/llama2_7b.py")
WORKDIR = "runs/vila2"
STAGES = VILA.STAGES + ("specialist",)
SUBSET_FRACTION = 0.05  # the paper's 5% of the pretraining pairs
SUBSET, REST = "data/coyo/pairs.vila2_subset.jsonl", "data/coyo/pairs.vila2_rest.jsonl"
CAPTION_SOURCE = "vila2_subset"  # the pretrain source the round's captions replace (loop --caption-source)
# ~12-word captions become ~120 words (~160 Llama-2 tokens) in the paper; 384 leaves room for the long tail, and a
# recaption that still hits the limit is counted and not used (combine keeps the original caption)
RECAPTION = dict(prompts=PROMPTS, max_new_tokens=384, temperature=0.7, mode="concat", subset=SUBSET_FRACTION)
SPECIALIST_SAMPLES = 100_000  # default steps only: `specialist train --epochs 1` counts the domain file


def get_config(stage: str = "align", *, workdir: str = WORKDIR):
    if stage not in STAGES:
        raise ValueError(f"configs/vila2/llama2_7b.py:{stage}: stages are {STAGES}")
    if stage == "specialist":
        c = VILA.get_config("sft", workdir=workdir)
        # VILA's SFT stage's export as this file names it (so `bench/memory.py --config ...:specialist` finds the
        # model); the loop's VILA^k (round{k}/sft/export) is set by `specialist train --model`
        c.model.path = VILA.get_config("sft", workdir=workdir).export_dir
        c.data.sources = (dict(format="llava", path="data/specialists/spatial.json",
                               image_root="data/specialists/images"),)
        c.train.steps = VILA.steps(SPECIALIST_SAMPLES, 128)
        c.export_dir = f"{workdir}/specialists/spatial/train/export"
        return c
    c = VILA.get_config(stage, workdir=workdir)
    if stage == "pretrain":
        docs, pairs = (dict(s) for s in c.data.sources)
        assert pairs["format"] == "caption", pairs
        c.data.sources = (docs,
                          {**pairs, "path": REST, "weight": pairs["weight"] * (1 - SUBSET_FRACTION),
                           "name": "vila2_rest"},
                          {**pairs, "path": SUBSET, "weight": pairs["weight"] * SUBSET_FRACTION,
                           "name": CAPTION_SOURCE})
    return c
