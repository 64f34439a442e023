"""Answer normalisation and per-sample scoring for VQA, multiple choice and yes/no tasks.

VQA normalisation follows the official VQA evaluation script (what published VQAv2 / TextVQA numbers use):
strip punctuation (removed next to spaces or in numbers like "1,000", otherwise replaced by a space), drop periods
not followed by a digit, lowercase, number words "zero".."ten" and "none" -> digits, drop articles a/an/the, and
restore common contractions ("dont" -> "don't"). VQA accuracy is the official leave-one-out form: the mean over
the 10 ways of leaving one human out of min(1, #remaining humans that gave the answer / 3); `leave_one_out=False`
gives the plain min(1, #humans / 3).
"""

from __future__ import annotations

import re
from typing import Sequence

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_NUM = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id": "I'd", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "shant": "shan't", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's",
    "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whats": "what's",
    "whered": "where'd", "wheres": "where's", "whos": "who's", "whove": "who've", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def normalize_answer(text: str) -> str:
    """Official VQA answer normalisation (see module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_NUM.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def exact_match(pred: str, answers: Sequence[str]) -> float:
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in answers))


def vqa_accuracy(pred: str, answers: Sequence[str], *, leave_one_out: bool = True) -> float:
    """VQAv2 soft accuracy of one prediction against the human answers (usually 10)."""
    p = normalize_answer(pred)
    gold = [normalize_answer(a) for a in answers]
    if not gold:
        raise ValueError("no reference answers")
    if not leave_one_out or len(gold) == 1:
        return min(1.0, sum(g == p for g in gold) / 3.0)
    accs = [min(1.0, sum(g == p for j, g in enumerate(gold) if j != i) / 3.0) for i in range(len(gold))]
    return sum(accs) / len(accs)


def first_vocab_answer(pred: str, vocab: Sequence[str]) -> str | None:
    """The earliest answer from a closed vocabulary that appears as whole words in the prediction."""
    p = " " + normalize_answer(pred) + " "
    hits = [(p.find(" " + normalize_answer(v) + " "), v) for v in vocab]
    hits = [(i, v) for i, v in hits if i >= 0]
    return min(hits)[1] if hits else None


LETTERS = "ABCDEFGHIJ"


def extract_choice(pred: str, choices: Sequence[str]) -> int | None:
    """Index of the option a free-form answer picks (ScienceQA / MMBench style), or None if it picks none.

    Tries, in order: a leading letter ("B", "(B)", "B. text", "B)"), "answer is B" / "Answer: (B)", one lone
    capital option letter in the text ("A" followed by a lowercase word is the article), then option text (the
    only option whose normalised text appears in the prediction, preferring the longest when one contains another).
    """
    letters = LETTERS[: len(choices)]
    text = pred.strip()

    def article(m) -> bool:  # "A red circle": the article, not option A
        return m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end(1):]) is not None

    m = re.match(rf"^\(?([{letters}])(?:[.):,\s]|$)", text)
    if m and not article(m):
        return letters.index(m.group(1))
    m = re.search(rf"answer\s*(?:is|:)?\s*:?\s*\(?([{letters}])\b", text, re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return letters.index(m.group(1).upper())
    lone = {m.group(1) for m in re.finditer(rf"(?<![A-Za-z'])([{letters}])(?![A-Za-z'])", text) if not article(m)}
    if len(lone) == 1:
        return letters.index(lone.pop())
    p = " " + normalize_answer(text) + " "
    found = [(len(c), i) for i, c in enumerate(choices) if normalize_answer(c) and f" {normalize_answer(c)} " in p]
    if found:
        found.sort(reverse=True)
        if len(found) == 1 or found[0][0] > found[1][0]:
            return found[0][1]
    return None


def extract_yes_no(pred: str) -> str:
    """POPE convention (as in LLaVA's eval): the first yes/no word decides; otherwise "not" means no, else yes."""
    words = re.findall(r"[a-z]+", pred.lower())
    for w in words:
        if w in ("yes", "no"):
            return w
    return "no" if "not" in words else "yes"


def yes_no_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 with "yes" as the positive class, and the yes ratio of the predictions."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
    tn = sum(p == "no" and g == "no" for p, g in zip(preds, golds))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, golds))
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "n": n}
