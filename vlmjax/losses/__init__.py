"""Pure loss functions on arrays (no model inside)."""

from vlmjax.losses.preference import PREFERENCE_LOSSES, REFERENCE_FREE, preference_loss
from vlmjax.losses.token import cross_entropy, segment_sums, sequence_logprobs, token_logprobs

__all__ = ["PREFERENCE_LOSSES", "REFERENCE_FREE", "preference_loss", "cross_entropy", "segment_sums",
           "sequence_logprobs", "token_logprobs"]
