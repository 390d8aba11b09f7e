"""`jaxboost eval --workdir DIR [--split test] [--config.KEY=VALUE ...]`: evaluates a run's best checkpoint.

The run's own config (DIR/config.json) is used, with any `--config.KEY=VALUE` overrides applied by
the same typed overrides as `jaxboost train` (a bad field is named); the task's `evaluate` prints the paper-style table and writes
DIR/eval_<split>.json.
"""
from __future__ import annotations

import argparse
import sys

from jaxboost import config as config_lib
from jaxboost import jsonio, registry
from jaxboost.train import workdir as workdir_lib

RAW_ARGV = True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxboost eval", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a jaxboost run directory")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise SystemExit(f"unrecognised argument {bad[0]!r}; expected --config.KEY=VALUE")
    workdir = workdir_lib.resolve(args.workdir)
    try:
        config = workdir_lib.read_config(workdir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    try:
        config = config_lib.override_config(config, rest, str(workdir / "config.json"))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    result = registry.trainer(config.trainer).evaluate(config, workdir, args.split)
    out = workdir / f"eval_{args.split}.json"
    jsonio.write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
