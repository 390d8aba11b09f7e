"""`jaxboost corpus build --camus DIR --out CORPUS [--size 256] [--records-per-shard N]`.

Reads a CAMUS folder (or the phantom) and writes the triplet corpus (see jaxboost.data.corpus).
Rerunning after a kill resumes: complete shards are kept, the unfinished one is rebuilt.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from jaxboost.data import corpus as corpus_lib


def _detect_source(root: Path) -> str:
    """'phantom' when the folder was written by `jaxboost phantom` (its PHANTOM marker), else 'camus'."""
    return "phantom" if (root / "PHANTOM.txt").is_file() else "camus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--camus", required=True, help="CAMUS folder (mhd or nii release) or a phantom")
    parser.add_argument("--out", required=True, help="corpus output folder (new, empty, or an unfinished build)")
    parser.add_argument("--size", type=int, default=256, help="square image size of the corpus")
    parser.add_argument("--records-per-shard", type=int, default=corpus_lib.DEFAULT_RECORDS_PER_SHARD,
                        help="about this many records per shard (shards hold whole images, 3 records each)")
    parser.add_argument("--source", choices=("camus", "phantom"), default=None,
                        help="source tag (default: phantom if the folder has PHANTOM.txt, else camus)")
    parser.add_argument("--writer-id", type=int, default=0, help="this writer's index (multi-host builds)")
    parser.add_argument("--num-writers", type=int, default=1)
    parser.add_argument("--finalize", action="store_true",
                        help="only merge the writers' parts into manifest.json (once, after all --num-writers ran)")
    parser.add_argument("--sleep-per-image", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: kill mid-build


def main(args) -> int:
    corpus_lib.check_size(args.size)  # before anything is read or written
    root = Path(args.camus)
    source = args.source or _detect_source(root)
    items, info = corpus_lib.camus_items(root, size=args.size, source=source)
    if args.finalize:
        manifest = corpus_lib.finalize_corpus(args.out, expect_writers=args.num_writers, source_info=info)
        print(f"corpus {args.out}: {manifest['counts']} ({manifest['num_records']} records) from "
              f"{args.num_writers} writers")
        return 0
    extra = {"source": source, "input": info["path"]}
    on_image = (lambda: time.sleep(args.sleep_per_image)) if args.sleep_per_image else None
    start = time.perf_counter()
    manifest = corpus_lib.build_corpus(
        items, args.out, size=args.size, source=source, writer_id=args.writer_id,
        num_writers=args.num_writers, records_per_shard=args.records_per_shard, source_info=info,
        extra_config=extra, on_image=on_image)
    seconds = time.perf_counter() - start
    if manifest is None:
        print(f"writer {args.writer_id} done; after all writers: the same command with --finalize")
        return 0
    total = manifest["num_records"]
    print(f"corpus {args.out}: {manifest['counts']} ({total} records, {len(manifest['shards'])} shards) "
          f"in {seconds:.1f}s")
    return 0
