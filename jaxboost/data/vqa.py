"""Medical VQA sets (VQA-RAD, SLAKE, PathVQA, echo-VQA) from local folders, and the answer protocol (MUMC, Li et al. 2023).

Folder layout: `{root}/trainset.json|train.json`, `valset.json|val.json|validate.json` (optional),
`testset.json|test.json`, `answer_list.json` (json list of strings; only the original protocol reads it) and
the images under `{root}/{image_dir}`. Each json is a list of items with `qid`, `image_name`, `question`,
`answer`, `answer_type` (CLOSED/OPEN) and optionally `question_type`.

Protocols (named, so runs can be compared):
- "fixed" (default): candidates are the training answers, exact match after normalisation, model selection
  on a validation split (carved from train, by image, where the dataset has none).
- "original": the public answer list (which includes test answers) and the lenient evaluator that also
  counts a prediction contained in the truth as correct.
"""
from __future__ import annotations

import dataclasses
import re
import string
import warnings
from pathlib import Path

from jaxboost.data.json_list import read_json_list
from typing import Callable, Sequence

import numpy as np

REQUIRED_FIELDS = ("qid", "image_name", "question", "answer", "answer_type")
ANSWER_TYPES = ("CLOSED", "OPEN")
SPLIT_FILES = {"train": ("trainset.json", "train.json"),
               "val": ("valset.json", "val.json", "validate.json"),
               "test": ("testset.json", "test.json")}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


@dataclasses.dataclass(frozen=True)
class VQAItem:
    qid: str
    image_path: Path
    question: str
    answer: str            # normalised
    answer_type: str       # CLOSED | OPEN
    question_type: str = ""


def normalize_answer(text) -> str:
    """Lowercase, x-ray -> xray, punctuation removed, whitespace collapsed."""
    text = str(text).lower().strip()
    text = re.sub(r"\bx-ray", "xray", text)
    text = _PUNCT.sub("", text)
    return " ".join(text.split())


# MUMC's pre_question (dataset/utils.py): these characters are dropped, then a few phrase rewrites.
_QUESTION_DROP = re.compile(r"""[,.'!?"()*#:;~]""")
_QUESTION_REWRITES = ((" \t", " "), ("is/are", "is"), ("near/in", "in"), (">", "more than "), ("-yes/no", ""),
                      ("x ray", "xray"), ("x-ray", "xray"))


def pre_question(question: str, max_words: int = 30) -> str:
    """MUMC's question cleaning: lowercase, punctuation dropped, its rewrites (x-ray -> xray, '>' -> 'more
    than'), trailing spaces cut, then at most `max_words` words (its training limit; 50 at test)."""
    text = _QUESTION_DROP.sub("", str(question).lower())
    for old, new in _QUESTION_REWRITES:
        text = text.replace(old, new)
    words = text.rstrip(" ").split(" ")
    return " ".join(words[:max_words])


def safe_image_path(root: Path, name: str, where: str) -> Path:
    """root / name, refusing absolute names and names that climb out of root (../, symlinks)."""
    root = Path(root).resolve()
    path = (root / str(name)).resolve()
    if Path(str(name)).is_absolute() or (path != root and root not in path.parents):
        raise ValueError(f"{where}: image path {name!r} escapes the dataset folder {root}")
    return path


TEXT_FIELDS = ("image_name", "question", "answer", "answer_type")


def read_vqa_json(path, image_root) -> list[VQAItem]:
    """One VQA json -> items; a missing field, a non-string text field (an answer 2, [..] or {..} is
    refused, not turned into the string "2") or a bad answer_type raises naming the item and its qid."""
    path = Path(path)
    data = read_json_list(path, "VQA file", "items")
    items = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: item {i} is not an object")
        where, qid = f"{path}: item {i}", (f" (qid {raw['qid']!r})" if raw.get("qid") is not None else "")
        for field in REQUIRED_FIELDS:
            if field not in raw or raw[field] is None:
                raise ValueError(f"{where} is missing field {field!r}{qid}")
        for field in TEXT_FIELDS + (("question_type",) if "question_type" in raw else ()):
            if not isinstance(raw[field], str):
                raise ValueError(f"{where} field {field!r} must be a string, got {type(raw[field]).__name__} "
                                 f"{raw[field]!r}{qid}")
        if isinstance(raw["qid"], bool) or not isinstance(raw["qid"], (str, int)):
            raise ValueError(f"{where} field 'qid' must be a string or an integer, got {raw['qid']!r}")
        answer_type = raw["answer_type"].upper()
        if answer_type not in ANSWER_TYPES:
            raise ValueError(f"{where} field 'answer_type' is {raw['answer_type']!r}, expected one of "
                             f"{ANSWER_TYPES}{qid}")
        answer = normalize_answer(raw["answer"])
        if not answer:
            raise ValueError(f"{where} field 'answer' {raw['answer']!r} is empty once normalised "
                             f"(punctuation removed){qid}")
        items.append(VQAItem(qid=str(raw["qid"]), image_path=safe_image_path(image_root, raw["image_name"], where),
                             question=raw["question"], answer=answer, answer_type=answer_type,
                             question_type=raw.get("question_type", "")))
    return items


def read_answer_list(path) -> list[str]:
    """answer_list.json -> its sorted unique normalised answers; a non-string entry is refused by index."""
    answers = read_json_list(path, "answer list", "answer strings")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise ValueError(f"{path}: entry {i} must be an answer string, got {type(answer).__name__} {answer!r}")
    return sorted({normalize_answer(a) for a in answers} - {""})


def _split_file(root: Path, split: str) -> Path | None:
    for name in SPLIT_FILES[split]:
        if (root / name).is_file():
            return root / name
    return None


def carve_validation(items: Sequence[VQAItem], fraction: float, seed: int):
    """Split train items by image (no image in both parts) -> (train, val), deterministic in `seed`."""
    images = sorted({it.image_path for it in items})
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = max(1, int(round(fraction * len(images)))) if len(images) > 1 else 0
    val_images = {images[i] for i in order[:n_val]}
    return ([it for it in items if it.image_path not in val_images],
            [it for it in items if it.image_path in val_images])


def load_vqa(root, split: str, *, image_dir: str = "images", val_fraction: float = 0.1,
             seed: int = 0) -> list[VQAItem]:
    """Items of `split` ('train' | 'val' | 'test'); val is carved from train when no val file exists."""
    root = Path(root)
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    image_root = root / image_dir
    if split == "test":
        path = _split_file(root, "test")
        if path is None:
            raise FileNotFoundError(f"{root}: no test file (one of {SPLIT_FILES['test']})")
        return read_vqa_json(path, image_root)
    val_path = _split_file(root, "val")
    if split == "val" and val_path is not None:
        return read_vqa_json(val_path, image_root)
    train_path = _split_file(root, "train")
    if train_path is None:
        raise FileNotFoundError(f"{root}: no training file (one of {SPLIT_FILES['train']})")
    train = read_vqa_json(train_path, image_root)
    if val_path is not None:
        return train
    train, val = carve_validation(train, val_fraction, seed)
    return train if split == "train" else val


# ------------------------------------------------------------------------------------------- protocols
def strict_match(pred: str, truth: str) -> bool:
    return normalize_answer(pred) == normalize_answer(truth)


def lenient_match(pred: str, truth: str) -> bool:
    """The original evaluator: exact, or the prediction contained in the truth."""
    p, t = normalize_answer(pred), normalize_answer(truth)
    return p == t or (bool(p) and p in t)


@dataclasses.dataclass(frozen=True)
class Protocol:
    candidates: str                          # "train" | "answer_list"
    match: Callable[[str, str], bool]


PROTOCOLS = {"fixed": Protocol("train", strict_match), "original": Protocol("answer_list", lenient_match)}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name]


def answer_candidates(root, protocol: str = "fixed", train_items: Sequence[VQAItem] | None = None,
                      **load_kwargs) -> list[str]:
    """Sorted unique normalised candidate answers: from the training items ("fixed") or answer_list.json."""
    if get_protocol(protocol).candidates == "answer_list":
        path = Path(root) / "answer_list.json"
        if not path.is_file():
            raise FileNotFoundError(f"protocol 'original' needs the public answer list: {path}")
        return read_answer_list(path)
    items = train_items if train_items is not None else load_vqa(root, "train", **load_kwargs)
    return sorted({it.answer for it in items} - {""})


def count_unanswerable(items: Sequence[VQAItem], candidates: Sequence[str], what: str = "items") -> int:
    """Answers missing from the candidate list can never be predicted: warn with the count and examples."""
    known = set(candidates)
    missing = [it for it in items if it.answer not in known]
    if missing:
        examples = ", ".join(repr(it.answer) for it in missing[:5])
        warnings.warn(f"{len(missing)} of {len(items)} {what} have an answer not in the candidate list "
                      f"({len(known)} answers), e.g. {examples}; they count as wrong", stacklevel=2)
    return len(missing)


def accuracy(predictions: Sequence[str], items: Sequence[VQAItem], protocol: str = "fixed") -> dict:
    """-> {"overall", "open", "closed"} accuracy (fraction; nan for an empty type) and counts, plus
    "type/{question_type}" and "n_type/{question_type}" for each question type the items name."""
    if len(predictions) != len(items):
        raise ValueError(f"{len(predictions)} predictions for {len(items)} items")
    match = get_protocol(protocol).match
    correct = np.array([match(p, it.answer) for p, it in zip(predictions, items)], bool)
    types = np.array([it.answer_type for it in items])
    mean = lambda m: float(correct[m].mean()) if m.any() else float("nan")
    out = {"overall": mean(np.ones(len(items), bool)), "open": mean(types == "OPEN"),
           "closed": mean(types == "CLOSED"), "n": len(items), "n_open": int((types == "OPEN").sum()),
           "n_closed": int((types == "CLOSED").sum())}
    question_types = np.array([it.question_type for it in items])
    for qt in sorted(set(question_types) - {""}):
        out[f"type/{qt}"], out[f"n_type/{qt}"] = mean(question_types == qt), int((question_types == qt).sum())
    return out
