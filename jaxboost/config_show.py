"""`jaxboost config show configs/NAME.py:VARIANT [--config.KEY=VALUE ...] [--json]`: every field of a config.

One `key = value` line per field, nested fields by their dotted `--config.` names (the overrides given are
applied first, so this is the config a `train` with the same flags would run); `--json` prints it as JSON.
A run directory (or its config.json) in place of the file shows the config that run saved, which is what
`jaxboost eval --workdir W --config.KEY=VALUE` overrides.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ml_collections import ConfigDict

from jaxboost import config as config_lib
from jaxboost import jsonio
from jaxboost.data import json_list

RAW_ARGV = True
FLAGS = {"json": ("boolean", False, "print the config as JSON instead of one `key = value` line per field")}
USAGE = "usage: jaxboost config show configs/NAME.py:VARIANT|WORKDIR [--config.KEY=VALUE ...] [--json]"


def format_fields(config) -> str:
    """`name = repr(value)` lines, names padded to one column."""
    fields = config_lib.flat_fields(config)
    width = max(map(len, fields), default=0)
    return "\n".join(f"{name:<{width}} = {value.to_dict() if isinstance(value, ConfigDict) else value!r}"
                     for name, value in fields.items())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + __doc__.split("\n\n", 1)[1].strip() + "\n\n" + config_lib.flags_help(FLAGS),
              file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    spec, rest = argv[0], argv[1:]
    if spec.startswith("-"):
        raise config_lib.ConfigError(f"expected configs/NAME.py:VARIANT first, got {spec!r}; {USAGE}")
    saved = Path(spec) / "config.json" if Path(spec).is_dir() else Path(spec)
    if saved.suffix == ".json":  # a run's own config
        config = ConfigDict(json_list.read_json(saved, f"{saved} not found: is {spec} a jaxboost run directory?"))
        as_json = "--json" in rest
        config = config_lib.override_config(config, [a for a in rest if a != "--json"], str(saved))
    else:
        config, values = config_lib.parse_flags(["jaxboost", f"--config={spec}", *rest], FLAGS)
        as_json = values["json"]
    print(jsonio.dumps(config.to_dict()) if as_json else format_fields(config))
    return 0
