"""VILA-7B (Lin et al., CVPR 2024; shared/recipes/vila.md): Llama-2-7B + CLIP-L/14-336 + a `linear` projector (the
paper's best), three stages, each starting from the previous stage's export folder:

    scripts/vila.sh WORKDIR LLM_DIR VISION_DIR DATA_ROOT                          # all stages, resumable
    python -m vlmjax.train --config configs/vila/llama2_7b.py:align --workdir W/align \\
        --config.export_dir=W/align/export --config.model.llm=/ckpt/Llama-2-7b-hf \\
        --config.model.vision=/ckpt/clip-vit-large-patch14-336
    python -m vlmjax.train --config configs/vila/llama2_7b.py:pretrain --workdir W/pretrain \\
        --config.model.path=W/align/export --config.export_dir=W/pretrain/export

align:    LLaVA-CC3M-595K caption pairs, `plain` template, only the projector trains; lr 1e-3, global batch 256,
          len 2048.
pretrain: MMC4-core interleaved docs (<= 6 images each) + COYO-25M pairs (top CLIP score; prepared with
          `python -m vlmjax.recipes.vila.prepare mmc4|coyo`), LLM + projector train, ViT frozen; lr 5e-5, global
          batch 1024, len 4096, loss on all text.
sft:      LLaVA-1.5 mix665k + 1M FLAN text-only (`prepare flan`), vicuna_v1 template; lr 2e-5, global 128, len 4096.
          The two sources are sampled by weights proportional to their sizes, so the steps cover each ~once.
All 1 epoch (as steps: the sample counts below / global batch), cosine, warmup 3%, no weight decay.
Global batch = hosts x data.batch_size x train.grad_accum (one 8-GPU host here; on N hosts divide grad_accum by N).
Stage hand-off: model.init="checkpoint" from WORKDIR/<previous stage>/export (the native checkpoint folder makes
`linear` / `downsample2x2_mlp` exportable).
"""

WORKDIR = "runs/vila"  # scripts/vila.sh overrides model.path / export_dir / data paths per run
STAGES = ("align", "pretrain", "sft")
ALIGN_SAMPLES = 595_375  # LLaVA-CC3M-Pretrain-595K
MMC4_DOCS, COYO_PAIRS = 25_000_000, 25_000_000  # MMC4-core, COYO-25M (25M each, VILA issue #207)
SFT_SAMPLES = 665_298 + 1_000_000  # llava_v1_5_mix665k + 1M FLAN

DATA = dict(
    align=(dict(format="caption", path="data/LLaVA-CC3M-Pretrain-595K/chat.json",
                image_root="data/LLaVA-CC3M-Pretrain-595K/images"),),
    pretrain=(dict(format="interleaved", path="data/mmc4/docs.jsonl", image_root="data/mmc4/images", weight=1.0,
                   format_options=dict(max_images=6)),
              dict(format="caption", path="data/coyo/pairs.jsonl", image_root="data/coyo/images", weight=1.0)),
    sft=(dict(format="llava", path="data/llava/llava_v1_5_mix665k.json", image_root="data/llava/images",
              weight=665_298 / SFT_SAMPLES),
         dict(format="llava", path="data/flan/flan_1m.jsonl", weight=1_000_000 / SFT_SAMPLES)),
)


def steps(samples: int, global_batch: int) -> int:
    """1 epoch in optimizer steps (ceil)."""
    return -(-samples // global_batch)


def get_config(stage: str = "align", *, workdir: str = WORKDIR, llm: str = "/path/to/Llama-2-7b-hf",
               vision: str = "/path/to/clip-vit-large-patch14-336", projector: str = "linear",
               sft_template: str = "vicuna_v1"):
    if stage not in STAGES:
        raise ValueError(f"configs/vila:{stage}: stages are {STAGES}")
    from vlmjax.train.defaults import base

    c = base()
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.optim.schedule = "cosine"
    c.optim.warmup_frac = 0.03
    c.optim.weight_decay = 0.0
    c.data.sources = DATA[stage]
    c.export_dir = f"{workdir}/{stage}/export"
    if stage == "align":
        c.model.init = "assemble"
        c.model.llm, c.model.vision, c.model.projector = llm, vision, projector
        c.train.trainable = ("^projector/",)
        c.optim.lr = 1e-3
        c.data.batch_size, c.train.grad_accum = 32, 8  # global 256
        c.train.steps = steps(ALIGN_SAMPLES, 256)  # 2,326
        c.data.seq_len = 2048
        c.data.max_images = 32
        c.data.text = dict(template="plain")
        return c
    c.model.init = "checkpoint"
    c.model.path = f"{workdir}/{STAGES[STAGES.index(stage) - 1]}/export"
    c.train.trainable = ("^projector/", "^llm/")  # ViT frozen
    c.data.seq_len = 4096
    if stage == "pretrain":
        c.optim.lr = 5e-5
        c.data.batch_size, c.train.grad_accum = 16, 64  # global 1024
        c.train.steps = steps(MMC4_DOCS + COYO_PAIRS, 1024)  # 48,829
        c.data.max_images = 96
        c.data.text = dict(template="plain", loss_on="all")
    else:
        c.optim.lr = 2e-5
        c.data.batch_size, c.train.grad_accum = 16, 8  # global 128
        c.train.steps = steps(SFT_SAMPLES, 128)  # 13,011
        c.data.max_images = 32
        c.data.text = dict(template=sft_template)
    return c
