"""`jaxboost corpus verify CORPUS`: re-check every shard's sha256 and entry count against manifest.json.

Prints one line per bad shard (missing, corrupt, truncated, replaced) and exits 1 if there is any; a build
hashes each shard once, when it finishes it, so this is the on-demand check of what is on disk now.
"""
from __future__ import annotations

import sys

from jaxboost.data import corpus as corpus_lib


def add_arguments(parser) -> None:
    parser.add_argument("corpus", help="corpus folder (with manifest.json)")


def main(args) -> int:
    corpus = corpus_lib.open_corpus(args.corpus)
    problems = corpus.verify()
    for line in problems:
        print(f"jaxboost: bad shard: {line}", file=sys.stderr)
    shards = len(corpus.manifest["shards"])
    if problems:
        print(f"corpus {corpus.path}: {len(problems)} of {shards} shards bad", file=sys.stderr)
        return 1
    print(f"corpus {corpus.path}: {shards} shards, {corpus.manifest['num_records']} records verified")
    return 0
