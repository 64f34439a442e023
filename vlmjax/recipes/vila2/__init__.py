"""VILA^2 (Fang et al., 2024): the model recaptions its own pretraining images, round after round.
See shared/recipes/vila2.md and the README section "VILA^2 (vlmjax/recipes/vila2)".

    recaption   round k: VILA^{k-1} describes every caption-pair image (one of 3 prompts, seeded by (round, id)),
                host-sharded and resumable (`generate.generate_dataset`)
    combine     round k: original caption + " " + recaption (or replace / original), checked against state.json,
                with a manifest of counts and word lengths
    state.json  the last finished step of each round (written atomically)
    loop        `loop --rounds N`: round 0 trains VILA^0; round k recaptions with VILA^{k-1}, combines, retrains
                every stage from scratch, evaluates; resumes inside a round from state.json; --min-gain stops early
    specialist  VILA^k fine-tuned on domain data (spatial / grounding / OCR) answers its domain prompt about every
                image of round k's captions (`recaption` with its prompts, in OUT/specialists/NAME); `append` adds
                the answers as QA turns after the caption (`caption_qa`), counting the unusable ones; the loop
                retrains the generalist on them (LoopSpec.caption_format="caption_qa")
    subset      the share of the pairs that is recaptioned (the paper's 5%), by a hash of each id
    miniature   the loop on easy-vqa with under-informative pre-training captions (README "VILA^2, reproduced in
                miniature"); `--ablations` includes a shape specialist
"""
