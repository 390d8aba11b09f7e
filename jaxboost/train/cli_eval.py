"""`jaxboost eval --workdir DIR [--split test] [--config.KEY=VALUE ...]`: evaluates a run's best checkpoint.

The run's own config (DIR/config.json) is used, with any `--config.KEY=VALUE` overrides applied by
ml_collections' own typed override flags; the task's `evaluate` prints the paper-style table and writes
DIR/eval_<split>.json.
"""
from __future__ import annotations

import argparse
import json
import sys

from absl import flags
from ml_collections import config_flags

from jaxboost import registry
from jaxboost.train import workdir as workdir_lib

RAW_ARGV = True


def apply_overrides(config, overrides: list[str]):
    """`--config.a.b=value` flags parsed against `config`'s own field types (absl names a bad field)."""
    fv = flags.FlagValues()
    argv = ["jaxboost eval", *overrides]
    config_flags.DEFINE_config_dict("config", config, "the run's config", flag_values=fv, lock_config=False,
                                    sys_argv=argv)
    try:
        fv(argv)
    except flags.Error as e:
        raise SystemExit(f"jaxboost eval: {e}") from None
    return fv.config


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
    config = apply_overrides(config, rest)
    result = registry.trainer(config.trainer).evaluate(config, workdir, args.split)
    out = workdir / f"eval_{args.split}.json"
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
