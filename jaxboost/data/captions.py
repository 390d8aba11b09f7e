"""Image-caption corpora for MUMC pretraining (ROCO, MedICaT, ImageCLEF 2022; echo captions from P6/P7).

Each json is a list of {"image": path relative to the image folder, "caption": str | [str, ...]}. Captions
are cleaned as ALBEF's `pre_caption` (lowercase, punctuation dropped, '-' and '/' split words) and cut to
30 words. An entry whose captions are all empty is counted and reported (warning + `stats`), never dropped
silently; a missing field raises naming the field and item index; image paths may not leave the folder.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from jaxboost.data.json_list import read_json_list
from typing import Sequence

from jaxboost.data.vqa import safe_image_path

MAX_WORDS = 30


@dataclasses.dataclass(frozen=True)
class CaptionItem:
    image_path: Path
    captions: tuple[str, ...]    # cleaned, non-empty; training picks one at random per visit


def clean_caption(text: str, max_words: int = MAX_WORDS) -> str:
    text = re.sub(r"([.!\"()*#:;~,'?])", "", str(text).lower())
    text = re.sub(r"[-/]", " ", text)
    return " ".join(text.split()[:max_words])


def read_caption_json(path, image_root, max_words: int = MAX_WORDS) -> tuple[list[CaptionItem], dict]:
    """-> (items, stats {"entries", "kept", "empty_captions", "empty_entries"})."""
    path = Path(path)
    data = read_json_list(path, "caption file", "{image, caption} items")
    items, empty_captions, empty_entries = [], 0, []
    for i, raw in enumerate(data):
        for field in ("image", "caption"):
            if not isinstance(raw, dict) or field not in raw or raw[field] is None:
                raise ValueError(f"{path}: item {i} is missing field {field!r}")
        caps = raw["caption"] if isinstance(raw["caption"], list) else [raw["caption"]]
        for value in [raw["image"], *caps]:  # a number or a dict would become the caption "2" or "a b"
            if not isinstance(value, str):
                raise ValueError(f"{path}: item {i}: image and caption must be strings, got "
                                 f"{type(value).__name__} {value!r}")
        cleaned = [clean_caption(c, max_words) for c in caps]
        empty_captions += sum(not c for c in cleaned)
        cleaned = tuple(c for c in cleaned if c)
        image = safe_image_path(image_root, raw["image"], f"{path} item {i}")
        if not cleaned:
            empty_entries.append(i)
            continue
        items.append(CaptionItem(image, cleaned))
    stats = {"entries": len(data), "kept": len(items), "empty_captions": empty_captions,
             "empty_entries": len(empty_entries)}
    if empty_captions:
        warnings.warn(f"{path}: {empty_captions} empty caption(s); {len(empty_entries)} item(s) with no "
                      f"caption left were skipped (first indices {empty_entries[:5]})", stacklevel=2)
    return items, stats


def read_caption_sets(paths: Sequence[str], image_roots: Sequence[str], max_words: int = MAX_WORDS):
    """Several corpora (e.g. ROCO + MedICaT + ImageCLEF) -> (all items, per-file stats)."""
    if len(paths) != len(image_roots):
        raise ValueError(f"{len(paths)} caption files but {len(image_roots)} image folders")
    items, stats = [], {}
    for path, root in zip(paths, image_roots):
        got, s = read_caption_json(path, root, max_words)
        items += got
        stats[str(path)] = s
    return items, stats
