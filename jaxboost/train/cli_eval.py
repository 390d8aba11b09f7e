"""`jaxboost eval --workdir DIR [--split test] [--config ...]`: evaluates a run's best checkpoint.

The run's own config (DIR/config.json) is used unless --config is given; the task's `evaluate` prints the
paper-style table and writes DIR/eval_<split>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections

from jaxboost import registry
from jaxboost.train.cli import parse

RAW_ARGV = True


def main(argv: list[str]) -> int:
    if "--config" not in " ".join(argv):
        if not argv or "--help" in argv or "-h" in argv:
            print("usage: jaxboost eval --workdir DIR [--split test|val|train] [--config.KEY=VALUE ...]")
            return 0
        args = dict(a.split("=", 1) if "=" in a else (a, "") for a in argv)
        workdir = args.get("--workdir")
        split = args.get("--split", "test")
        if not workdir:
            raise SystemExit("--workdir DIR is required")
        cfg_path = Path(workdir) / "config.json"
        if not cfg_path.exists():
            raise SystemExit(f"{cfg_path} not found: is {workdir} a jaxboost run directory?")
        config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
        for a, v in args.items():
            if a.startswith("--config."):
                _set_override(config, a[len("--config."):], v)
    else:
        config, values = parse(argv, {"split": ("string", "test", "split to evaluate (train|val|test)")})
        workdir, split = values["workdir"], values["split"]
    result = registry.trainer(config.trainer).evaluate(config, workdir, split)
    out = Path(workdir) / f"eval_{split}.json"
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")
    return 0


def _set_override(config, dotted: str, value: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    old = node.get(leaf)
    node[leaf] = type(old)(value) if old is not None and not isinstance(old, bool) else (
        value.lower() in ("1", "true") if isinstance(old, bool) else value)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
