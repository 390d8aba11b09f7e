"""`jaxboost corpus show CORPUS [--png grid.png] [--json] [--n 8]`: counts, example prompts, a PNG grid."""
from __future__ import annotations

import collections
import json
import os
import sys

import numpy as np

from jaxboost import plots
from jaxboost.data import corpus as corpus_lib

SHOWN_PROMPT = (7, 0)  # P7 (shape + every attribute), ending "of the heart": printed and drawn alike


def summarize(corpus: corpus_lib.Corpus, n_examples: int = 8) -> dict:
    """Counts per split / source / structure / view / quality (one pass over the records) and examples."""
    records, images, stored = int(sum(corpus.manifest["counts"].values())), corpus.num_images(), corpus.num_bytes()
    summary = {"path": str(corpus.path), "size": corpus.size, "schema_version": corpus.schema_version,
               "counts": corpus.manifest["counts"], "records": records, "images": images, "bytes": stored,
               "bytes_per_triplet": stored / max(records, 1), "by_split": {}, "examples": []}
    for split in corpus_lib.SPLITS:
        tallies = {name: collections.Counter() for name in ("source", "structure", "view", "phase", "quality")}
        patients = set()
        for record in corpus.iter(split, arrays=False):
            for name, tally in tallies.items():
                tally[record[name]] += 1
            patients.add(record["patient"])
            if len(summary["examples"]) < n_examples:
                summary["examples"].append({"key": record["key"], "split": split,
                                            "prompt": record["prompts"][SHOWN_PROMPT[0]][SHOWN_PROMPT[1]]})
        summary["by_split"][split] = {"patients": len(patients), **{k: dict(sorted(v.items())) for k, v in tallies.items()}}
    return summary


def draw_grid(corpus: corpus_lib.Corpus, png_path: str, n: int = 8, split: str | None = None) -> None:
    """n rows of (image, structure overlay, P7 prompt text) from the first non-empty split."""
    split = split or next(s for s in corpus_lib.SPLITS if corpus.split_len(s) > 0)
    source = corpus.source(split)
    indices = np.linspace(0, len(source) - 1, min(n, len(source))).astype(int)
    rows, titles = [], []
    for index in indices:
        record = source[int(index)]
        structure = np.where(record["mask"] == record["label"], record["mask"], 0)
        rows.append([record["image"], plots.overlay(record["image"], structure),
                     record["prompts"][SHOWN_PROMPT[0]][SHOWN_PROMPT[1]]])
        titles.append([record["key"], f"{record['structure']} (label {record['label']})", ""])
    plots.image_grid(png_path, rows, titles, title=f"{corpus.path}: {split} split")


def add_arguments(parser) -> None:
    parser.add_argument("corpus", help="corpus folder (with manifest.json)")
    parser.add_argument("--png", default=None, help="write a grid of examples to this PNG file")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--n", type=int, default=8, help="number of examples (0: counts only)")
    parser.add_argument("--split", default=None, choices=corpus_lib.SPLITS, help="split drawn in the grid")


def main(args) -> int:
    if args.n < 0 or (args.png and args.n < 1):
        raise ValueError(f"--n {args.n}: must be >= 1 with --png (rows of the grid), >= 0 otherwise")
    corpus = corpus_lib.open_corpus(args.corpus)
    summary = summarize(corpus, args.n)
    try:
        _print_summary(summary, args.json)
        if args.png:
            draw_grid(corpus, args.png, args.n, args.split)
            print(f"wrote {args.png}")
        sys.stdout.flush()
    except BrokenPipeError:  # `corpus show | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    return 0


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"corpus {summary['path']}  size {summary['size']}  schema v{summary['schema_version']}  "
          f"{summary['records']} records  {summary['images']} images  "
          f"{summary['bytes_per_triplet']:.0f} bytes per triplet")
    for split, info in summary["by_split"].items():
        print(f"  {split:<5} {summary['counts'][split]:>7} records  {info['patients']} patients  "
              f"source {info['source']}  structure {info['structure']}  quality {info['quality']}")
    if summary["examples"]:
        print(f"examples (P{SHOWN_PROMPT[0]}, ending {SHOWN_PROMPT[1]}):")
    for example in summary["examples"]:
        print(f"  {example['key']}: {example['prompt']}")
