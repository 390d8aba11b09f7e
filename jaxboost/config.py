"""Config loading the big_vision way: `--config configs/NAME.py:VARIANT --config.key=value`.

Parsing and the typed `--config.a.b=value` overrides are ml_collections' own `config_flags`; this module
only resolves where `configs/` lives and gives the trainer CLIs one function to call.
"""
from __future__ import annotations

import os
from pathlib import Path

from absl import flags
from ml_collections import ConfigDict, config_flags

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config_path(spec: str) -> str:
    """`configs/sdm.py:tiny`, `sdm.py:tiny` or `sdm:tiny` -> an existing file path + `:variant`."""
    path, sep, variant = spec.partition(":")
    candidates = [Path(path), CONFIG_DIR / path, CONFIG_DIR / f"{path}.py", CONFIG_DIR / Path(path).name]
    for c in candidates:
        if c.is_file():
            return f"{c}{sep}{variant}"
    raise FileNotFoundError(f"config file {path!r} not found (looked in . and {CONFIG_DIR})")


def load_config(spec: str, overrides: list[str] | None = None) -> ConfigDict:
    """Loads `spec` and applies `overrides` such as `["total_steps=10", "model.width=32"]`."""
    argv = ["jaxboost", f"--config={resolve_config_path(spec)}"]
    argv += [o if o.startswith("--config.") else f"--config.{o}" for o in (overrides or [])]
    config, _ = parse_flags(argv)
    return config


def parse_flags(argv: list[str], extra: dict[str, tuple[str, str | None, str]] | None = None):
    """Parses `--config ... --config.x=y` plus string flags `extra` {name: (kind, default, help)}.

    Returns (config, {name: value}). Unknown flags raise absl's own error naming the flag.
    """
    fv = flags.FlagValues()
    argv = list(argv)
    for i, a in enumerate(argv):
        if a.startswith("--config=") or (a == "--config" and i + 1 < len(argv)):
            if a == "--config":
                argv[i + 1] = resolve_config_path(argv[i + 1])
            else:
                argv[i] = "--config=" + resolve_config_path(a.split("=", 1)[1])
    # sys_argv: config_flags registers the `--config.x` override flags from the argv it is given.
    config_flags.DEFINE_config_file("config", None, "configs/NAME.py:VARIANT", flag_values=fv,
                                    lock_config=False, sys_argv=argv)
    for name, (kind, default, help_) in (extra or {}).items():
        getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=fv)
    try:
        fv(argv)
    except flags.Error as e:  # absl wraps the config file's own error; surface the cause
        cause = e.__cause__ or e.__context__
        raise (cause if isinstance(cause, (ValueError, FileNotFoundError)) else ValueError(str(e))) from e
    if fv.config is None:
        raise ValueError("--config configs/NAME.py:VARIANT is required")
    return fv.config, {name: getattr(fv, name) for name in (extra or {})}


def flags_help(extra: dict[str, tuple[str, str | None, str]] | None = None) -> str:
    lines = ["  --config configs/NAME.py:VARIANT   config file and variant (e.g. configs/sdm.py:tiny)",
             "  --config.KEY=VALUE                 override any config field (typed, nested with dots)"]
    for name, (_, default, help_) in (extra or {}).items():
        lines.append(f"  --{name:<32} {help_} (default: {default})")
    return "\n".join(lines)


def variant(arg: str | None, known: tuple[str, ...]) -> str:
    """The variant string of `get_config(arg)`, checked against the config's known variants."""
    arg = arg or known[0]
    if arg not in known:
        raise ValueError(f"unknown config variant {arg!r}; choose one of {known}")
    return arg


def env_flag(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(int(default))).lower() in ("1", "true", "yes")
