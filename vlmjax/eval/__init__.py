"""Evaluation: answer extraction + metrics (VQA, multiple choice, yes/no, captioning), task loaders for local
benchmark files, a runner on the KV-cache generation engine, and the built-in easy-vqa benchmark.

    from vlmjax.eval import easy_vqa_accuracy, evaluate, tasks
    easy_vqa_accuracy(model, tokenizer, n=200)["accuracy"]
    evaluate(model, tokenizer, tasks.pope("coco_pope_random.json", "val2014/"), out_dir="results/")
"""

from vlmjax.eval import tasks
from vlmjax.eval.answers import (exact_match, extract_choice, extract_yes_no, normalize_answer, vqa_accuracy,
                                 yes_no_metrics)
from vlmjax.eval.caption import bleu, cider_d
from vlmjax.eval.easy_vqa import easy_vqa_accuracy
from vlmjax.eval.runner import evaluate, format_table, predict, score

__all__ = ["tasks", "exact_match", "extract_choice", "extract_yes_no", "normalize_answer", "vqa_accuracy",
           "yes_no_metrics", "bleu", "cider_d", "easy_vqa_accuracy", "evaluate", "format_table", "predict", "score"]
