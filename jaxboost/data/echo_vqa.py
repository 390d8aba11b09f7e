"""`jaxboost vqa build --corpus DIR --out DIR`: an echo-VQA set in the VQA-RAD format, from the triplet corpus
(one corpus for both methods), so the phantom or the synthetic corpus feeds MUMC pretraining and VQA without any download.

Written to OUT (built in a temporary folder, renamed at the end: no partial output):
    images/{image}.png              the echo image (grayscale)
    images/{image}_{LV|MYO|LA}.png  the image with one structure highlighted (tinted red, RGB)
    trainset.json valset.json testset.json   VQA-RAD items: qid, image_name, question, answer,
                                             answer_type CLOSED/OPEN, question_type (no valset.json when
                                             the corpus has no val split: the reader carves one)
    answer_list.json                every answer of every split (as the public lists; protocol "original")
    captions_train.json             [{image, caption: [P6, P7 with both endings]}] for pretraining
Questions per image: open (view, phase; on a highlighted image: which structure) and closed yes/no (phase,
sex, quality when known, view, presence of each structure). The corpus split is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

STRUCTURE_WORDS = {"LV": "left ventricle", "MYO": "myocardium", "LA": "left atrium"}
LABELS = {"LV": 1, "MYO": 2, "LA": 3}
VIEW_WORDS = {"2CH": "two chamber", "4CH": "four chamber"}
PHASE_WORDS = {"ED": "end diastole", "ES": "end systole"}
SPLIT_FILES = {"train": "trainset.json", "val": "valset.json", "test": "testset.json"}


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def image_questions(meta: dict, present: dict[str, bool]) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, question_type) about a whole image."""
    view, phase = VIEW_WORDS[meta["view"]], PHASE_WORDS[meta["phase"]]
    qs = [("which view is this echocardiogram?", view, "OPEN", "view"),
          ("which phase of the cardiac cycle is shown?", phase, "OPEN", "phase"),
          ("is this image taken at end diastole?", _yes_no(meta["phase"] == "ED"), "CLOSED", "phase"),
          ("is this a four chamber view?", _yes_no(meta["view"] == "4CH"), "CLOSED", "view"),
          ("is the patient female?", _yes_no(meta["sex"] == "F"), "CLOSED", "sex")]
    if meta.get("quality"):
        qs.append(("is the image quality good?", _yes_no(meta["quality"] == "Good"), "CLOSED", "quality"))
        qs.append(("is the image quality poor?", _yes_no(meta["quality"] == "Poor"), "CLOSED", "quality"))
    for s, word in STRUCTURE_WORDS.items():
        qs.append((f"is the {word} visible?", _yes_no(present[s]), "CLOSED", "presence"))
    return qs


def highlight(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Gray [S, S] uint8 + boolean region -> RGB [S, S, 3] with the region tinted red."""
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=-1)
    tint = np.array([255.0, 0.0, 0.0])
    rgb[region] = 0.5 * rgb[region] + 0.5 * tint
    return rgb.round().astype(np.uint8)


def _image_stem(key: str) -> str:
    """'phantom/p001_2CH_ED/LV' -> 'phantom_p001_2CH_ED' (safe file name)."""
    stem = "_".join(key.split("/")[:-1])
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)


def _group_by_image(records):
    """Corpus records (3 per image, one per structure) -> {image stem: {structure: record}}, in order."""
    groups: dict[str, dict] = {}
    for rec in records:
        groups.setdefault(_image_stem(rec["key"]), {})[rec["structure"]] = rec
    return groups


def build_echo_vqa(corpus_dir, out_dir, limit_per_split: int | None = None) -> dict:
    """Write the echo-VQA folder; returns counts. Refuses an existing non-empty OUT."""
    from jaxboost.data.corpus import SPLITS, open_corpus
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: output folder exists and is not empty")
    corpus = open_corpus(corpus_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        (tmp / "images").mkdir()
        counts, answers, captions = {}, set(), []
        for split in SPLITS:
            items = []
            groups = _group_by_image(corpus.iter(split)) if corpus.split_len(split) else {}
            for n, (stem, by_structure) in enumerate(groups.items()):
                if limit_per_split is not None and n >= limit_per_split:
                    break
                rec = next(iter(by_structure.values()))
                image, mask = np.asarray(rec["image"], np.uint8), np.asarray(rec["mask"], np.uint8)
                Image.fromarray(image).save(tmp / "images" / f"{stem}.png")
                present = {s: bool((mask == LABELS[s]).any()) for s in STRUCTURE_WORDS}
                qa = [(f"{stem}.png", *q) for q in image_questions(rec, present)]
                for s, srec in by_structure.items():
                    if not present[s]:  # nothing to highlight (and nothing to caption)
                        continue
                    name = f"{stem}_{s}.png"
                    Image.fromarray(highlight(image, mask == LABELS[s])).save(tmp / "images" / name)
                    qa.append((name, "which structure is highlighted?", STRUCTURE_WORDS[s], "OPEN", "structure"))
                    if split == "train":
                        captions.append({"image": name, "caption": [*srec["prompts"][6], *srec["prompts"][7]]})
                for image_name, question, answer, answer_type, qtype in qa:
                    items.append({"qid": len(items), "image_name": image_name, "question": question,
                                  "answer": answer, "answer_type": answer_type, "question_type": qtype})
                    answers.add(answer)
            counts[split] = len(items)
            if split == "val" and not items:
                continue  # no valset.json: the reader carves validation from train (by image)
            (tmp / SPLIT_FILES[split]).write_text(json.dumps(items, indent=1))
        (tmp / "answer_list.json").write_text(json.dumps(sorted(answers)))
        (tmp / "captions_train.json").write_text(json.dumps(captions, indent=1))
        counts["captions"] = len(captions)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, help="triplet corpus folder (jaxboost corpus build)")
    parser.add_argument("--out", required=True, help="new folder for the VQA-RAD-format set")
    parser.add_argument("--limit-per-split", type=int, default=None, help="at most this many images per split")


def main(args) -> int:
    counts = build_echo_vqa(args.corpus, args.out, args.limit_per_split)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
