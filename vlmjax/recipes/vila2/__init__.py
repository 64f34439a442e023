"""VILA^2 (Fang et al., 2024): the model recaptions its own pretraining images, round after round.
See shared/recipes/vila2.md and the README section "VILA^2 (vlmjax/recipes/vila2)".

    recaption   round k: VILA^k describes every caption-pair image (one of 3 prompts, seeded by (round, id)),
                host-sharded and resumable (`generate.generate_dataset`)
    combine     round k: original caption + " " + recaption (or replace / original), checked against state.json,
                with a manifest of counts and word lengths
    state.json  the last finished step of each round (written atomically)

Next (needs the stage runner, `vlmjax.train.stages`): `loop --rounds N` (retrain all stages from scratch on the
combined captions, eval, stop when the gain is below --min-gain) and `specialist`.
"""
