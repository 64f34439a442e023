"""VILA^2 (Fang et al., 2024): the model recaptions its own pretraining images, round after round.
See shared/recipes/vila2.md and the README section "VILA^2 (vlmjax/recipes/vila2)".

    recaption   round k: VILA^{k-1} describes every caption-pair image (one of 3 prompts, seeded by (round, id)),
                host-sharded and resumable (`generate.generate_dataset`)
    combine     round k: original caption + " " + recaption (or replace / original), checked against state.json,
                with a manifest of counts and word lengths
    state.json  the last finished step of each round (written atomically)
    loop        `loop --rounds N`: round 0 trains VILA^0; round k recaptions with VILA^{k-1}, combines, retrains
                every stage from scratch, evaluates; resumes inside a round from state.json; --min-gain stops early
    miniature   the loop on easy-vqa with under-informative pre-training captions (README "VILA^2, reproduced in
                miniature")

Next: `specialist` (spatial / grounding / OCR specialists recaptioning with their own prompts).
"""
