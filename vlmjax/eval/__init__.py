"""Evaluation: answer extraction + metrics (VQA, multiple choice, yes/no, captioning), task loaders for local
benchmark files, a runner on the KV-cache generation engine, and the built-in easy-vqa benchmark.

    from vlmjax.eval import easy_vqa_accuracy, evaluate, tasks
    easy_vqa_accuracy(model, tokenizer, n=200)["accuracy"]
    evaluate(model, tokenizer, tasks.pope("coco_pope_random.json", "val2014/"), out_dir="results/")
    evaluate(model, tokenizer, tasks.easy_vqa("test", n=200, shots=4, template="plain"))   # 4-shot, stage-2 model
    evaluate(llm, tokenizer, tasks.mmlu("mmlu/data/test"))                  # multiple choice by option likelihood
    evaluate(model, tokenizer, tasks.with_mode(tasks.scienceqa(...), method="loglik"), mesh=mesh)  # any mc task
    text_perplexity(llm, tokenizer, "wiki.txt")["perplexity"]
"""

from vlmjax.eval import tasks
from vlmjax.eval.answers import (exact_match, extract_choice, extract_yes_no, normalize_answer, vqa_accuracy,
                                 yes_no_metrics)
from vlmjax.eval.caption import bleu, cider_d
from vlmjax.eval.easy_vqa import easy_vqa_accuracy
from vlmjax.eval.likelihood import text_perplexity
from vlmjax.eval.runner import evaluate, format_table, predict, score

__all__ = ["tasks", "exact_match", "extract_choice", "extract_yes_no", "normalize_answer", "vqa_accuracy",
           "yes_no_metrics", "bleu", "cider_d", "easy_vqa_accuracy", "evaluate", "format_table", "predict", "score",
           "text_perplexity"]
