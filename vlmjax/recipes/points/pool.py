"""The POINTS miniature's noisy caption pool: easy-vqa train images 0-2999, 3 captions each, with the kinds of noise
web captions carry and an existing VLM's perplexity ranks high.

    clean        30%  "A teal triangle." (easy-vqa's three caption templates)
    mismatched   30%  another image's clean caption (an image whose colour or shape differs)
    obscure      20%  the clean caption + a serial / version tail: "A teal triangle, SKU 4471-B rev 2.3."
    openclipart  15%  a real, unrelated clip-art caption: "Clip art of sledge, tagged winter, vehicle." (the titles and
                      keywords of Debian's openclipart-svg; `apt-get install -y openclipart-svg`, as root)
    generic       5%  "An image."

Shares are exact (largest remainder), assigned to the pool's slots by a seeded permutation; every record keeps its
noise kind and the image's true colour and shape (for the report only, never for training or filtering).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

NOISE = (("clean", 0.30), ("mismatched", 0.30), ("obscure", 0.20), ("openclipart", 0.15), ("generic", 0.05))
KINDS = tuple(k for k, _ in NOISE)
GENERIC = ("An image.",)
OPENCLIPART_ROOT = "/usr/share/openclipart"
INSTALL = "apt-get update && apt-get install -y openclipart-svg"
POOL_IMAGES = (0, 3000)  # mini_base.RECIPE_POOL: images the shared base never saw
PER_IMAGE = 3


class MissingOpenclipart(FileNotFoundError):
    pass


def read_records(path) -> list[dict]:
    """A JSONL file's records (this module stays free of jax: its tests and the pool need none)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def noise_counts(total: int, shares=NOISE) -> dict[str, int]:
    """Exact counts per kind summing to `total` (largest remainder; ties by the listed order)."""
    raw = [(k, share * total) for k, share in shares]
    counts = {k: int(np.floor(v)) for k, v in raw}
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i][1] - np.floor(raw[i][1])), i))
    for i in order[:total - sum(counts.values())]:
        counts[raw[i][0]] += 1
    return counts


def obscure_tail(rng: np.random.Generator) -> str:
    """A serial number / version string no image shows ("SKU 4471-B rev 2.3")."""
    d = lambda k: "".join(str(int(x)) for x in rng.integers(0, 10, k))  # noqa: E731
    letter = chr(ord("A") + int(rng.integers(26)))
    form = int(rng.integers(3))
    if form == 0:
        return f"SKU {d(4)}-{letter} rev {int(rng.integers(1, 10))}.{d(1)}"
    if form == 1:
        return f"part no. {d(2)}-{d(4)} v{int(rng.integers(1, 10))}.{d(1)}.{d(1)}"
    return f"model {letter}{chr(ord('A') + int(rng.integers(26)))}-{d(3)} build {d(4)}"


def with_tail(clean: str, tail: str) -> str:
    return f"{clean.rstrip('.')}, {tail}."


def openclipart_captions(n: int, *, seed: int = 0, root: str | os.PathLike = OPENCLIPART_ROOT,
                         tags: int = 2) -> list[str]:
    """n distinct "Clip art of TITLE, tagged K1, K2." captions from the SVGs' Dublin Core metadata
    (`vlmjax.data.openclipart`), drawn in a seeded order. Raises MissingOpenclipart with the install command."""
    from vlmjax.data.openclipart import _fallback_title, make_caption, svg_metadata

    svg = Path(root) / "svg"
    if not svg.is_dir():
        raise MissingOpenclipart(f"{svg} not found: the POINTS miniature's unrelated-caption noise comes from Debian's "
                                 f"openclipart-svg; install it with `{INSTALL}` (as root)")
    files = []
    for dirpath, dirnames, filenames in os.walk(svg):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.endswith(".svg") and not os.path.islink(os.path.join(dirpath, f))]
    out, seen = [], set()
    for i in np.random.default_rng(seed).permutation(len(files)):
        meta = svg_metadata(files[i])
        stem = os.path.splitext(os.path.basename(files[i]))[0]
        title = meta["title"] or _fallback_title(stem)
        keywords = [k for k in meta["keywords"] if k.lower() != " ".join(title.replace("_", " ").split()).lower()]
        cap = make_caption(title, keywords[:tags], title)
        if cap not in seen:
            seen.add(cap)
            out.append(cap)
            if len(out) == n:
                return out
    raise ValueError(f"{svg}: only {len(out)} distinct captions, {n} needed")


def build_pool(captions_path, out, *, seed: int = 0, images=POOL_IMAGES, per_image: int = PER_IMAGE,
               openclipart_root=OPENCLIPART_ROOT) -> dict:
    """easy-vqa train images `images` whose colour and shape are known (captions_path: the base data's
    train_captions.jsonl) x per_image slots -> OUT (caption records, JSONL: id, image, caption, noise, color, shape)
    and OUT.info.json (counts). Skipped when done; returns the info."""
    from vlmjax.data.easy_vqa import caption

    out = Path(out)
    info_path = out.with_suffix(".info.json")
    if info_path.exists() and out.exists():
        return json.loads(info_path.read_text())
    truth = {r["id"]: r for r in read_records(captions_path)}
    imgs = [(n, truth[f"train_{n}"]) for n in range(*images)
            if truth.get(f"train_{n}", {}).get("color") and truth[f"train_{n}"].get("shape")]
    if len(imgs) < 2:
        raise ValueError(f"{captions_path}: fewer than 2 images of train {images} with a known colour and shape")
    slots = [(n, a, j) for n, a in imgs for j in range(per_image)]
    counts = noise_counts(len(slots))
    rng = np.random.default_rng(seed)
    kinds = np.array([k for k in KINDS for _ in range(counts[k])])[rng.permutation(len(slots))]
    clip = iter(openclipart_captions(counts["openclipart"], seed=seed, root=openclipart_root))
    rows = []
    for (n, attrs, j), kind in zip(slots, kinds):
        clean = caption(attrs, j)
        if kind == "clean":
            text = clean
        elif kind == "mismatched":  # an image that differs in colour or shape: the caption is really wrong
            while True:
                m, other = imgs[int(rng.integers(len(imgs)))]
                if (other["color"], other["shape"]) != (attrs["color"], attrs["shape"]):
                    break
            text = caption(other, int(rng.integers(3)))
        elif kind == "obscure":
            text = with_tail(clean, obscure_tail(rng))
        elif kind == "openclipart":
            text = next(clip)
        else:
            text = GENERIC[int(rng.integers(len(GENERIC)))]
        rows.append({"id": f"train_{n}_c{j}", "image": f"train/{n}.png", "caption": text, "noise": str(kind),
                     "color": attrs["color"], "shape": attrs["shape"]})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    info = {"images": len(imgs), "pairs": len(rows), "counts": counts, "seed": seed, "image_range": list(images),
            "skipped_images": images[1] - images[0] - len(imgs), "examples": {k: next(r["caption"] for r in rows
                                                                                   if r["noise"] == k) for k in KINDS}}
    info_path.write_text(json.dumps(info, indent=1))
    return info


def auc(high, low) -> float:
    """P(a `high` value > a `low` value) + 0.5 P(tie): the ROC AUC of separating the two by value (Mann-Whitney U /
    (n_high n_low)), e.g. high = mismatched captions' PPL, low = clean ones'."""
    high, low = np.asarray(high, np.float64), np.asarray(low, np.float64)
    if not len(high) or not len(low):
        raise ValueError(f"auc needs values on both sides (got {len(high)} and {len(low)})")
    values = np.concatenate([high, low])
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(1, len(values) + 1)
    _, group = np.unique(values, return_inverse=True)  # tied values share their mean rank
    ranks = (np.bincount(group, ranks) / np.bincount(group))[group]
    u = ranks[:len(high)].sum() - len(high) * (len(high) + 1) / 2
    return float(u / (len(high) * len(low)))


def corpus_ppl(scores) -> float:
    """exp(total NLL / total tokens) over scored texts ({"sum_logprob", "num_tokens"} records of
    `scoring.score_dataset`): every token weighs the same, unlike the mean of per-text PPLs."""
    scores = list(scores)
    tokens = sum(int(s["num_tokens"]) for s in scores)
    if not tokens:
        raise ValueError("corpus_ppl: no scored tokens")
    return float(np.exp(-sum(float(s["sum_logprob"]) for s in scores) / tokens))


def kept_by_noise(pool: list[dict], kept_ids) -> dict:
    """{kind: {"kept": fraction of that kind's pairs kept, "share": its share of the kept set}}."""
    kept_ids = set(kept_ids)
    out = {}
    for k in KINDS:
        ids = [r["id"] for r in pool if r["noise"] == k]
        n_kept = sum(i in kept_ids for i in ids)
        out[k] = {"kept": n_kept / len(ids) if ids else 0.0, "share": n_kept / max(len(kept_ids), 1)}
    return out


def presentations(records: list, n: int, seed: int) -> list:
    """Exactly n records for one pass: each record floor(n / len) times, a seeded random set of the rest once more,
    in a seeded order (so every arm presents the same number of captions, whatever its size)."""
    if not records:
        raise ValueError("no records to present")
    rng = np.random.default_rng(seed)
    reps, extra = divmod(n, len(records))
    idx = np.concatenate([np.tile(np.arange(len(records)), reps),
                          rng.choice(len(records), extra, replace=False)]).astype(int)
    return [records[i] for i in idx[rng.permutation(len(idx))]]
