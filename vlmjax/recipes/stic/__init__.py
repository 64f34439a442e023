"""STIC (Deng et al., 2024): self-training on image comprehension. See shared/recipes/stic.md and the README.

    make_preferences   stage 1a: self-built preference pairs from unlabeled images (corruptions really applied)
    (vlmjax.train)     stage 1b: DPO + alpha x NLL, LoRA + projector, reference = adapter off (configs/stic/*:stage1)
    make_infused_sft   stage 2 data: the stage-1 model's descriptions infused into instruction data
    (vlmjax.train)     stage 2: SFT continuing the stage-1 adapter (configs/stic/*:stage2)
    dar                describe-and-respond evaluation
    miniature          the whole recipe on offline easy-vqa (make demo)
"""
