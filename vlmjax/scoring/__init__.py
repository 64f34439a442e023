"""Scoring: target-span log-likelihood / perplexity and hidden-state features, batched and jitted.

    sequence_scores(model, ids, target_mask, pixel_values, image_rows)   -> per-row sum/mean logprob, perplexity
    features(model, ids, lengths, pixel_values, image_rows, layers=(3, 7), parts=("attn", "resid"), span="all")
    score_dataset(...) / capture_dataset(...)                             -> resumable JSONL / .npy shards per host
    open_shards(dir) / merge_feature_shards(host_dirs, dir, ids=...)      -> memory-mapped reader / coverage merge
"""

from vlmjax.scoring.capture import features, group_weights
from vlmjax.scoring.loglik import pad_rows, sequence_scores, token_logprobs
from vlmjax.scoring.runs import capture_dataset, host_dir, score_dataset
from vlmjax.scoring.shards import FeatureShards, ShardWriter, load_shards, merge_feature_shards, open_shards

__all__ = ["features", "group_weights", "pad_rows", "sequence_scores", "token_logprobs", "capture_dataset",
           "score_dataset", "host_dir", "FeatureShards", "ShardWriter", "load_shards", "merge_feature_shards",
           "open_shards"]
