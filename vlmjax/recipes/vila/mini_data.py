"""The data of VILA's miniature (README "VILA, reproduced in miniature"): a text corpus C, its held-out split and fact
QA items, interleaved documents and the matching image-caption pairs, all as files in the trainer's formats.

C: documents of sentences about openclipart drawings (Debian `openclipart-svg`: title, category, keywords) and
templated facts about the easy-vqa world ("A triangle has three corners."), 10% of the documents held out (by a
hash of their id, so the split does not move when C grows). Fact QA items (the MMLU analogue): multiple choice,
one question per world fact and per collection fact (`collection_facts`: which collection a drawing of C's training
split is in, the knowledge C's sentences state), half of the facts asked in the SFT text-only blend ("blend"), the other half evaluated only
("eval"). Documents: 3-6 images each (easy-vqa recipe-pool images, optionally openclipart drawings rendered to PNG),
each image before its matched sentence (its caption), between sentences of C's training split; pairs: the same
images with the same captions, in `caption` format.

Files (under OUT): corpus_train.jsonl / corpus_heldout.jsonl ({"id", "text"}: `likelihood.read_texts`), text_lm.jsonl
(the training split as text-only `interleaved` documents), fact_qa.jsonl ({"id", "question", "choices", "answer"
letter, "split"}), fact_blend.json (text-only `llava` QA of the blend facts), docs.jsonl (`interleaved`),
pairs.jsonl (`caption`), images/ (easy_vqa -> the easy-vqa image folder, clipart/*.png), prepared.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np

OPENCLIPART_SVG = "/usr/share/openclipart/svg"
INSTALL = "apt-get update && apt-get install -y openclipart-svg   (as root; Debian/Ubuntu)"
HELDOUT = 0.10
N_COLLECTION = 400  # collection facts (about half asked in the blend, half evaluated)
# what the evaluations prompt with (easy-vqa's describe request, plain-template QA, the chat template's roles)
SFT_DESCRIBE = ("Describe the image.", "Describe the image briefly.")
EVAL_TEXTS = ("Describe the image.", "Question: Answer:", "user", "assistant", "system")

# The easy-vqa world: each fact is (subject, relation, answer, distractors, paraphrases of the statement, question)
SHAPE_FACTS = {
    "triangle": {"corners": "three", "sides": "three", "looks like": "a slice of pizza"},
    "rectangle": {"corners": "four", "sides": "four", "looks like": "a door"},
    "circle": {"corners": "no", "sides": "no straight", "looks like": "a coin"},
}
COLOR_FACTS = {"red": ("a strawberry", "warm"), "green": ("grass", "cool"), "blue": ("the sky", "cool"),
               "black": ("the night", "dark"), "gray": ("a rain cloud", "dark"), "teal": ("a peacock feather", "cool"),
               "brown": ("a tree trunk", "warm"), "yellow": ("a banana", "warm")}


def _hash(text: str) -> float:
    """A stable number in [0, 1) for `text` (the held-out split and the blend/eval split follow it)."""
    return zlib.crc32(text.encode()) / 2 ** 32


def facts() -> list[dict]:
    """Every easy-vqa world fact: {"id", "statements" (paraphrases), "question", "answer", "choices"}."""
    out = []
    for shape, f in SHAPE_FACTS.items():
        for rel, q in (("corners", "How many corners does a {s} have?"), ("sides", "How many sides does a {s} have?")):
            ans = f[rel]
            choices = sorted({SHAPE_FACTS[s][rel] for s in SHAPE_FACTS})
            out.append({"id": f"{shape}_{rel}", "question": q.format(s=shape), "answer": ans, "choices": choices,
                        "statements": [f"A {shape} has {ans} {rel}.", f"Every {shape} has {ans} {rel}.",
                                       f"The {shape} is a shape with {ans} {rel}."]})
        looks = f["looks like"]
        out.append({"id": f"{shape}_looks", "question": f"Which thing looks like a {shape}?", "answer": looks,
                    "choices": sorted(SHAPE_FACTS[s]["looks like"] for s in SHAPE_FACTS),
                    "statements": [f"{looks[0].upper() + looks[1:]} looks like a {shape}.",
                                   f"A {shape} looks like {looks}.", f"The shape of {looks} is a {shape}."]})
    for color, (thing, kind) in COLOR_FACTS.items():
        out.append({"id": f"{color}_thing", "question": f"What colour is {thing}?", "answer": color,
                    "choices": _color_choices(color),
                    "statements": [f"{thing[0].upper() + thing[1:]} is {color}.", f"The colour of {thing} is {color}.",
                                   f"{color[0].upper() + color[1:]} is the colour of {thing}."]})
        out.append({"id": f"{color}_kind", "question": f"Is {color} a warm, cool or dark colour?", "answer": kind,
                    "choices": ["cool", "dark", "warm"],
                    "statements": [f"{color[0].upper() + color[1:]} is a {kind} colour.",
                                   f"People call {color} a {kind} colour."]})
    return out


def _color_choices(color: str) -> list[str]:
    """The right colour and the next two in COLOR_FACTS' order (a fixed, deterministic set of 3 options)."""
    names = list(COLOR_FACTS)
    i = names.index(color)
    return sorted({names[i], names[(i + 1) % len(names)], names[(i + 3) % len(names)]})


def collection_facts(clipart: list[dict], train: list[dict], n: int | None = N_COLLECTION) -> list[dict]:
    """Knowledge questions about C's own training text: "Which collection is the drawing TITLE in?", answered by the
    category C's sentence names ("TITLE is a drawing in the CAT collection."), 3 options (the category + 2 others by
    a hash of the drawing). Only drawings in C's training split whose title names one category (openclipart files
    one title under several), n of them spread over those. They make the fact-QA column large enough to read: the
    text LM learns them from C, pre-training can erode them, and the blend asks the other half in QA form."""
    trained = {d["id"][5:] for d in train if d["id"].startswith("clip:")}
    by_title: dict[str, set] = {}
    for c in clipart:
        by_title.setdefault(" ".join(c["title"].replace("_", " ").split()), set()).add(c["category"])
    cats = sorted({c["category"] for c in clipart})
    if len(cats) < 3:
        raise ValueError(f"collection facts need >= 3 openclipart categories, got {cats}")
    out, seen = [], set()
    for c in clipart:
        title = " ".join(c["title"].replace("_", " ").split())
        if c["id"] not in trained or len(by_title[title]) != 1 or title in seen:
            continue
        seen.add(title)
        others = [x for x in cats if x != c["category"]]
        k = int(_hash("choices:" + c["id"]) * len(others))
        choices = sorted({c["category"], others[k], others[(k + len(others) // 2) % len(others)]})
        out.append({"id": "collection:" + c["id"], "question": f"Which collection is the drawing {title} in?",
                    "answer": c["category"], "choices": choices})
    return spread(out, n)


def fact_qa(items: list[dict]) -> list[dict]:
    """Multiple-choice items: {"id", "question", "choices", "answer" (letter), "split" blend | eval}."""
    out = []
    for f in items:
        if f["answer"] not in f["choices"]:
            raise ValueError(f"fact {f['id']}: answer {f['answer']!r} not among its choices {f['choices']}")
        out.append({"id": f["id"], "question": f["question"], "choices": f["choices"],
                    "answer": chr(65 + f["choices"].index(f["answer"])),
                    "split": "blend" if _hash("qa:" + f["id"]) < 0.5 else "eval"})
    return out


def blend_records(qa: list[dict]) -> list[dict]:
    """The SFT text-only blend: `llava` records (no image) of the "blend" split's fact QA items, question -> the right
    choice's text."""
    return [{"id": f"qa_{q['id']}", "conversations": [
        {"from": "human", "value": q["question"]},
        {"from": "gpt", "value": q["choices"][ord(q["answer"]) - 65]}]} for q in qa if q["split"] == "blend"]


def clipart_sentences(title: str, category: str, keywords: list[str]) -> list[str]:
    """C's sentences about one drawing: its title and category, then up to 4 of its keywords."""
    title = " ".join(title.replace("_", " ").split())
    kws = [k for i, k in enumerate(keywords) if k.lower() != title.lower() and k not in keywords[:i]][:4]
    out = [f"{title} is a drawing in the {category} collection."]
    if len(kws) == 1:
        out.append(f"It is tagged {kws[0]}.")
    elif kws:
        out.append(f"It is tagged {', '.join(kws[:-1])} and {kws[-1]}.")
    return out


def scan_clipart(root: str = OPENCLIPART_SVG, limit: int | None = None) -> list[dict]:
    """[{"id", "svg", "title", "category", "keywords"}] of the drawings with a title, in sorted path order. With a
    `limit` (quick runs), the first drawings of each top-level category in turn, so a small scan still spans the
    collections (the collection-fact questions need >= 3)."""
    from vlmjax.data.openclipart import svg_metadata

    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} not found: the VILA miniature's corpus needs openclipart metadata; {INSTALL}")

    def drawings(top: str):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not name.endswith(".svg") or os.path.islink(path):
                    continue
                meta = svg_metadata(path)
                if not meta["title"].strip():
                    continue
                rel = os.path.relpath(path, root)
                yield {"id": os.path.splitext(rel)[0], "svg": path, "title": meta["title"],
                       "category": rel.split(os.sep)[0], "keywords": meta["keywords"]}

    if limit is None:
        return list(drawings(root))
    streams = [drawings(os.path.join(root, d)) for d in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, d))]
    rows: list[dict] = []
    while streams and len(rows) < limit:
        for it in list(streams):
            row = next(it, None)
            if row is None:
                streams.remove(it)
            elif len(rows) < limit:
                rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def corpus(clipart: list[dict], fact_items: list[dict]) -> list[dict]:
    """C as documents {"id", "text", "sentences"}: one per drawing, one per fact (its paraphrases). openclipart holds
    the same drawing under several names and categories: a document whose text is already in C is dropped, so no
    held-out document is a verbatim copy of a training one."""
    docs = [{"id": "clip:" + c["id"], "sentences": clipart_sentences(c["title"], c["category"], c["keywords"])}
            for c in clipart]
    docs += [{"id": "fact:" + f["id"], "sentences": list(f["statements"])} for f in fact_items]
    seen, out = set(), []
    for d in docs:
        d["text"] = " ".join(d["sentences"])
        if d["text"] not in seen:
            seen.add(d["text"])
            out.append(d)
    return out


def spread(rows: list, n: int | None) -> list:
    """n rows evenly spaced over `rows` (all of them when n is None or >= len): every category, not the first."""
    if n is None or n >= len(rows):
        return list(rows)
    return [rows[int(i * len(rows) / n)] for i in range(n)]


def verbatim_fraction(train: list[dict], held: list[dict]) -> float:
    """Fraction of held-out documents each of whose sentences also occurs in the training split (near-duplicates:
    openclipart series share titles and tags); reported with the data so the held-out perplexity can be read."""
    seen = {s for d in train for s in d["sentences"]}
    return sum(all(s in seen for s in d["sentences"]) for d in held) / max(len(held), 1)


def split_corpus(docs: list[dict], heldout: float = HELDOUT) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by a hash of each document id; facts always train (their QA is the knowledge test)."""
    train, held = [], []
    for d in docs:
        (held if not d["id"].startswith("fact:") and _hash(d["id"]) < heldout else train).append(d)
    return train, held


def render_svg(svg: str, png: Path, size: int = 64) -> bool:
    """svg -> size x size PNG on white with rsvg-convert; False when it cannot be rendered."""
    exe = shutil.which("rsvg-convert")
    if exe is None:
        return False
    png.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([exe, "-w", str(size), "-h", str(size), "-a", "-b", "white", "-o", str(png), svg],
                       check=True, capture_output=True, timeout=20)
    except (subprocess.SubprocessError, OSError):
        return False
    return png.exists() and png.stat().st_size > 0


def make_documents(images: list[dict], sentences: list[str], rng: np.random.Generator, *,
                   lo: int = 3, hi: int = 6) -> list[dict]:
    """`interleaved` documents of lo..hi images each (every image in exactly one document, in order): per image one
    or two C sentences, then its caption (the image's matched sentence), then one closing C sentence.
    images: [{"id", "image", "caption"}]."""
    if not sentences:
        raise ValueError("make_documents: no C sentences to put between the images")
    docs, i = [], 0
    while i < len(images):
        k = int(rng.integers(lo, hi + 1))
        group = images[i:i + k]
        if len(group) < lo and docs:  # a short tail joins the previous document's images (at most hi + lo - 1)
            group, docs = docs[-1]["_group"] + group, docs[:-1]
        text, info = [], []
        for im in group:
            for _ in range(int(rng.integers(1, 3))):
                text.append(sentences[int(rng.integers(len(sentences)))])
            info.append({"image": im["image"], "matched_text_index": len(text), "matched_sim": 1.0})
            text.append(im["caption"])
        text.append(sentences[int(rng.integers(len(sentences)))])
        docs.append({"id": f"doc{len(docs)}", "text_list": text, "image_info": info, "_group": group})
        i += k
    for d in docs:
        del d["_group"]
    return docs


def pairs_of(docs: list[dict]) -> list[dict]:
    """The documents cut into (image, matched sentence) `caption` pairs (arm (c); with our documents also arm (b)'s
    pairs: the same images, the same captions)."""
    return [{"id": f"{d['id']}_{j}", "image": im["image"], "caption": d["text_list"][im["matched_text_index"]]}
            for d in docs for j, im in enumerate(d["image_info"])]


def unigram_perplexity(train: list[list[int]], test: list[list[int]], vocab_size: int, alpha: float = 1.0) -> float:
    """Perplexity of an add-alpha unigram model fitted on `train` token ids, on `test`'s tokens after each sequence's
    first (the tokens `likelihood.text_perplexity` predicts): the gate's reference for "the text LM learned C"."""
    counts = np.bincount(np.concatenate([np.asarray(t, np.int64) for t in train]), minlength=vocab_size)
    logp = np.log((counts + alpha) / (counts.sum() + alpha * vocab_size))
    rest = [np.asarray(t[1:], np.int64) for t in test if len(t) > 1]
    pred = np.concatenate(rest) if rest else np.zeros(0, np.int64)
    if not len(pred):
        raise ValueError("unigram_perplexity: no test token to predict")
    return float(np.exp(-logp[pred].mean()))


def sft_records(records: dict, used: list[str], n: int, seed: int) -> list[dict]:
    """`llava` SFT records of the n recipe-pool train images after the pretraining ones (`used`, in pool order):
    easy-vqa's description turn (asked as SFT_DESCRIBE) and QA turns in a random order (`mini_base.sft_turns`),
    the image path under images/easy_vqa/."""
    from vlmjax.recipes.mini_base import RECIPE_POOL, sft_turns

    last = max((int(i.split("_")[1]) for i in used), default=RECIPE_POOL[0] - 1)
    ids = [f"train_{k}" for k in range(last + 1, RECIPE_POOL[1]) if f"train_{k}" in records][:n]
    if len(ids) < n:
        raise ValueError(f"sft_records: only {len(ids)} recipe-pool train images after train_{last}, {n} asked")
    return [{"id": i, "image": "easy_vqa/" + records[i]["image"],
             "conversations": sft_turns(records[i]["conversations"],
                                        np.random.default_rng(zlib.crc32(f"{seed}:{i}".encode())), prompts=SFT_DESCRIBE)}
            for i in ids]


def _jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def build(out: Path, *, easy_images: str | Path, easy_captions: str | Path, n_easy: int = 600, n_clipart: int = 1500,
          n_clipart_images: int = 120, seed: int = 0, image_size: int = 64, svg_root: str = OPENCLIPART_SVG,
          scan_limit: int | None = None, n_sft: int = 600,
          sft_texts: list[str] = (), vocab_size: int = 2048) -> dict:
    """Write every file of the module docstring under `out` (+ out/tokenizer fitted to all of their text and
    `sft_texts`). C's drawings: n_clipart evenly spread over the deduplicated drawings among the first `scan_limit`
svg files (all by default). easy-vqa images: the first n_easy train images of the recipe pool with both attributes known
    (`easy_captions`: the easy-vqa builder's train_captions.jsonl); SFT: the next n_sft pool images' QA conversations
    (its train.json, `sft_records`). Skipped when out/prepared.json exists."""
    from vlmjax.data.tokenizer import train_tokenizer
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.recipes.mini_base import RECIPE_POOL

    out = Path(out)
    done = out / "prepared.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fact_items = facts()
    scanned = scan_clipart(svg_root, limit=scan_limit)
    keep = {d["id"][5:] for d in spread(corpus(scanned, []), n_clipart)}  # deduplicated, then n_clipart of them
    clipart = [c for c in scanned if c["id"] in keep]
    train, held = split_corpus(corpus(clipart, fact_items))
    _jsonl(out / "corpus_train.jsonl", ({"id": d["id"], "text": d["text"]} for d in train))
    _jsonl(out / "corpus_heldout.jsonl", ({"id": d["id"], "text": d["text"]} for d in held))
    _jsonl(out / "text_lm.jsonl", ({"id": d["id"], "text_list": d["sentences"], "image_info": []} for d in train))
    collection = collection_facts(clipart, train)
    qa = fact_qa(fact_items + collection)
    _jsonl(out / "fact_qa.jsonl", qa)
    blend = blend_records(qa)
    (out / "fact_blend.json").write_text(json.dumps(blend))

    images = out / "images"
    images.mkdir(exist_ok=True)
    link = images / "easy_vqa"
    if not link.exists():
        link.symlink_to(Path(easy_images).resolve(), target_is_directory=True)
    caps = read_jsonl(easy_captions)
    pool = [caps[f"train_{n}"] for n in range(*RECIPE_POOL) if f"train_{n}" in caps]
    pool = [c for c in pool if c.get("shape") and c.get("color")][:n_easy]
    ims = [{"id": c["id"], "image": "easy_vqa/" + c["image"], "caption": c["caption"]} for c in pool]
    records = {r["id"]: r for r in json.loads((Path(easy_captions).parent / "train.json").read_text())}
    sft = sft_records(records, [c["id"] for c in pool], n_sft, seed)
    (out / "sft.json").write_text(json.dumps(sft))
    # drawings with an image: the held-out drawings are never shown (their sentences test text skill only)
    held_ids = {d["id"][5:] for d in held}
    rendered = 0
    for c in clipart:
        if rendered >= n_clipart_images:
            break
        if c["id"] in held_ids:
            continue
        rel = f"clipart/{rendered}.png"
        if (images / rel).exists() or render_svg(c["svg"], images / rel, image_size):
            ims.append({"id": "clip:" + c["id"], "image": rel,
                        "caption": clipart_sentences(c["title"], c["category"], c["keywords"])[0]})
            rendered += 1
    order = rng.permutation(len(ims))
    ims = [ims[i] for i in order]
    sentences = [s for d in train for s in d["sentences"]]
    docs = make_documents(ims, sentences, rng)
    _jsonl(out / "docs.jsonl", docs)
    _jsonl(out / "pairs.jsonl", pairs_of(docs))
    texts = [d["text"] for d in train] + [im["caption"] for im in ims] + [q["question"] for q in qa]
    texts += [c for q in qa for c in q["choices"]] + list(sft_texts) + list(EVAL_TEXTS)
    texts += [t["value"].replace("<image>", "").strip() for r in sft for t in r["conversations"]]
    train_tokenizer(sorted(set(texts)), out / "tokenizer", vocab_size=vocab_size)
    info = {"corpus_train": len(train), "corpus_heldout": len(held), "clipart_drawings": len(clipart),
            "heldout_verbatim_fraction": round(verbatim_fraction(train, held), 3),
            "facts": len(fact_items), "collection_facts": len(collection),
            "fact_qa_eval": sum(q["split"] == "eval" for q in qa), "blend": len(blend),
            "images": len(ims), "easy_vqa_images": len(pool), "clipart_images": rendered, "documents": len(docs),
            "pairs": sum(len(d["image_info"]) for d in docs), "sft": len(sft), "seed": seed,
            "vocab_size": vocab_size}
    done.write_text(json.dumps(info))
    return info
