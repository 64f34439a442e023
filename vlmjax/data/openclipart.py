"""Offline dataset builder: Debian's `openclipart-png` + `openclipart-svg` -> caption pairs.

The PNG renderings carry no text, but each SVG source has Dublin Core metadata (a title and keyword list) in its
RDF block, which makes a small, real, license-clean captioning set without network access. Only the metadata
block is parsed (streaming, stopping at </metadata>), so the 180 MB of SVG are mostly not read.

    python -m vlmjax.data.openclipart --out DIR [--root /usr/share/openclipart] [--limit N]

writes DIR/captions.jsonl ({"id", "image", "caption", "title", "keywords", "description"}, images relative to
ROOT/png), DIR/descriptions.jsonl (caption records whose caption is the author's short dc:description, for the
drawings that have one) and DIR/source.json ({"image_root": ROOT/png}). Symlinked duplicates (the same drawing in
several categories) are kept once.
"""

from __future__ import annotations

import argparse
import json
import os
import xml.etree.ElementTree as ET

from tqdm.auto import tqdm

DEFAULT_ROOT = "/usr/share/openclipart"


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def svg_metadata(path_or_file) -> dict:
    """{"title", "description", "keywords"} of the drawing (the cc:Work), not of its creator/publisher agents."""
    title, description, keywords = "", "", []
    depth_in_work = None
    depth = 0
    try:
        for event, elem in ET.iterparse(path_or_file, events=("start", "end")):
            name = _local(elem.tag)
            if event == "start":
                depth += 1
                if name == "Work" and depth_in_work is None:
                    depth_in_work = depth
                continue
            depth -= 1
            if depth_in_work is not None and depth == depth_in_work:  # a direct child of the Work ended
                if name == "title" and not title:
                    title = (elem.text or "").strip()
                elif name == "description" and not description:
                    description = (elem.text or "").strip()
                elif name == "subject":
                    keywords = [(li.text or "").strip() for li in elem.iter() if _local(li.tag) == "li"]
            if name == "Work" and depth_in_work is not None and depth < depth_in_work:
                break
            if name == "metadata":
                break
    except ET.ParseError:
        pass  # a broken SVG still yields a caption from its file name
    return {"title": title, "description": description, "keywords": [k for k in keywords if k]}


def make_caption(title: str, keywords: list[str], fallback: str) -> str:
    title = " ".join((title or fallback).replace("_", " ").split())
    unique = [k for i, k in enumerate(keywords) if k.lower() != title.lower() and k not in keywords[:i]]
    tags = f", tagged {', '.join(unique[:8])}" if unique else ""
    return f"Clip art of {title}{tags}."


def _fallback_title(rel: str) -> str:
    stem = os.path.splitext(os.path.basename(rel))[0]
    return stem.rsplit("_", 1)[0] if stem.rsplit("_", 1)[-1].isdigit() else stem


def build(out: str, root: str = DEFAULT_ROOT, limit: int | None = None, progress: bool = True) -> dict[str, int]:
    png_root, svg_root = os.path.join(root, "png"), os.path.join(root, "svg")
    if not os.path.isdir(png_root):
        raise FileNotFoundError(f"{png_root} not found: apt-get install openclipart-png openclipart-svg")
    seen, rows = set(), []
    stats = {"images": 0, "with_metadata": 0, "duplicates": 0, "descriptions": 0}
    bar = tqdm(desc="openclipart", unit="image", total=limit, disable=not progress)
    for dirpath, dirnames, filenames in os.walk(png_root):
        dirnames.sort()
        for filename in sorted(filenames):
            if not filename.endswith(".png"):
                continue
            path = os.path.join(dirpath, filename)
            real = os.path.realpath(path)
            if real in seen:
                stats["duplicates"] += 1
                continue
            seen.add(real)
            rel = os.path.relpath(path, png_root)
            svg = os.path.join(svg_root, os.path.splitext(rel)[0] + ".svg")
            meta = svg_metadata(svg) if os.path.isfile(svg) else {"title": "", "description": "", "keywords": []}
            stats["with_metadata"] += bool(meta["title"] or meta["keywords"])
            rows.append({"id": os.path.splitext(rel)[0], "image": rel,
                         "caption": make_caption(meta["title"], meta["keywords"], _fallback_title(rel)),
                         "title": meta["title"], "keywords": meta["keywords"],
                         "description": " ".join(meta["description"].split())})
            stats["images"] += 1
            bar.update()
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    bar.close()
    descriptions = [{"id": r["id"], "image": r["image"], "caption": r["description"], "title": r["title"]}
                    for r in rows if r["description"]]
    stats["descriptions"] = len(descriptions)
    os.makedirs(out, exist_ok=True)
    for name, recs in (("captions.jsonl", rows), ("descriptions.jsonl", descriptions)):
        _write(os.path.join(out, name), "".join(json.dumps(r) + "\n" for r in recs))
    _write(os.path.join(out, "source.json"), json.dumps({"image_root": png_root, "format": "caption"}))
    return stats


def _write(path: str, text: str) -> None:
    """Whole file or nothing: a temporary file renamed into place."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vlmjax.data.openclipart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (captions.jsonl, source.json)")
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"openclipart install (default: {DEFAULT_ROOT})")
    parser.add_argument("--limit", type=int, default=None, help="first N images (for quick tests)")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.out, args.root, args.limit), indent=1))


if __name__ == "__main__":
    main()
