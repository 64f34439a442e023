"""Caption metrics from their definitions: corpus BLEU-4 (Papineni et al.) and CIDEr-D (Vedantam et al.).

Both follow the coco-caption implementations (the numbers captioning papers report): BLEU is corpus-level with
clipped n-gram counts and the brevity penalty on the closest reference length (ties -> the shorter reference);
CIDEr-D uses TF-IDF n-gram vectors (n = 1..4) with document frequencies over the evaluated set's references,
clips the candidate's weights by the reference's, multiplies by a Gaussian length penalty (sigma = 6, on the
bigram counts as coco-caption does), averages over references and n, and scales by 10.
Tokenisation: lowercase, words = runs of letters/digits (coco-caption's PTB tokeniser also drops punctuation).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i: i + n]) for i in range(len(words) - n + 1))


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-max_n of hypotheses (one per image) against their reference lists."""
    tiny, small = 1e-15, 1e-9  # coco-caption's smoothing: only keeps a zero count from taking log(0)
    correct, guess = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, refs):
        h = tokenize(hyp)
        rts = [tokenize(r) for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rts)[1]
        for n in range(1, max_n + 1):
            hc = ngrams(h, n)
            max_ref = Counter()
            for r in rts:
                max_ref |= ngrams(r, n)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in hc.items())
            guess[n - 1] += max(len(h) - n + 1, 0)
    log_p = sum(math.log((correct[n] + tiny) / (guess[n] + small)) for n in range(max_n)) / max_n
    ratio = (hyp_len + tiny) / (ref_len + small)
    bp = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    return bp * math.exp(log_p)


def _tfidf(words: Sequence[str], df: Counter, log_n: float, max_n: int):
    vecs, norms = [], []
    for n in range(1, max_n + 1):
        vec = {g: tf * (log_n - math.log(max(1.0, df[g]))) for g, tf in ngrams(words, n).items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms, max(len(words) - 1, 0)  # length = number of bigrams (coco-caption)


def cider_d(hyps: Sequence[str], refs: Sequence[Sequence[str]], *, max_n: int = 4, sigma: float = 6.0
            ) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-image scores). Document frequencies come from the references of these images."""
    ref_toks = [[tokenize(r) for r in rs] for rs in refs]
    df: Counter = Counter()
    for rts in ref_toks:
        df.update({g for r in rts for n in range(1, max_n + 1) for g in ngrams(r, n)})
    log_n = math.log(float(len(refs)))
    scores = []
    for hyp, rts in zip(hyps, ref_toks):
        hv, hn, hl = _tfidf(tokenize(hyp), df, log_n, max_n)
        total = [0.0] * max_n
        for r in rts:
            rv, rn, rl = _tfidf(r, df, log_n, max_n)
            penalty = math.exp(-((hl - rl) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                val = sum(min(w, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, w in hv[n].items())
                if hn[n] and rn[n]:
                    val /= hn[n] * rn[n]
                total[n] += val * penalty
        scores.append(10.0 * sum(total) / max_n / max(len(rts), 1))
    return (sum(scores) / len(scores) if scores else 0.0), scores
