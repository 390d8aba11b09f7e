"""`jaxboost eval --workdir DIR [--split test] [--config.KEY=VALUE ...]`: evaluates a run's best checkpoint.

The run's own config (DIR/config.json) is used, with any `--config.KEY=VALUE` overrides applied; the task's
`evaluate` prints the paper-style table and writes DIR/eval_<split>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ml_collections

from jaxboost import registry

RAW_ARGV = True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxboost eval", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a jaxboost run directory")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    args, rest = parser.parse_known_args(argv)
    cfg_path = Path(args.workdir) / "config.json"
    if not cfg_path.exists():
        raise SystemExit(f"{cfg_path} not found: is {args.workdir} a jaxboost run directory?")
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    overrides = {}
    for a in rest:
        if not a.startswith("--config.") or "=" not in a:
            raise SystemExit(f"unrecognised argument {a!r}; expected --config.KEY=VALUE")
        key, value = a[len("--config."):].split("=", 1)
        old = config
        for part in key.split("."):
            old = old[part]
        overrides[key] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true")
    config.update_from_flattened_dict(overrides)
    result = registry.trainer(config.trainer).evaluate(config, args.workdir, args.split)
    out = Path(args.workdir) / f"eval_{args.split}.json"
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
