"""Config loading the big_vision way: `--config configs/NAME.py:VARIANT --config.key=value`.

Parsing and the typed `--config.a.b=value` overrides are ml_collections' own `config_flags`; this module
resolves where `configs/` lives, gives the trainer CLIs one function to call (`parse_flags`; `override_config`
for a run's saved config) and turns ml_collections' bare errors into one ConfigError naming the config file
and the field: an unknown field (with close matches), a value of the wrong type (with the expected type), a
file without a variant or without get_config.
"""
from __future__ import annotations

import difflib
import sys
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


class ConfigError(ValueError):
    """A config file, variant or `--config.KEY=VALUE` override the user got wrong; the message names it."""


# What absl / ml_collections raise for a bad config file, field or value.
PARSE_ERRORS = (flags.Error, AttributeError, KeyError, ValueError, TypeError, SyntaxError, ImportError)


def parse_flags(argv: list[str], extra: dict[str, tuple[str, str | None, str]] | None = None):
    """Parses `--config ... --config.x=y` plus string flags `extra` {name: (kind, default, help)}.

    Returns (config, {name: value}). An unknown field, a value of the wrong type or a broken config file
    raises ConfigError naming the file and the field; unknown flags raise absl's own error naming the flag.
    """
    argv = _resolve_config_args(argv)
    if not _config_spec(argv):
        raise ConfigError("--config configs/NAME.py:VARIANT is required")
    fv = _flag_values(argv, extra)
    try:
        positional = _parse(fv, argv)[1:]
    except PARSE_ERRORS as e:
        if isinstance(e, flags.UnrecognizedFlagError):
            raise ValueError(str(e)) from None
        raise _explain_failure(e, argv) from None
    if positional:
        raise ValueError(f"unexpected argument {positional[0]!r} (flags are --name=value)")
    return fv.config, {name: getattr(fv, name) for name in (extra or {})}


def _resolve_config_args(argv: list[str]) -> list[str]:
    """`--config X` / `--config=X` with X resolved to an existing file (see resolve_config_path)."""
    argv = list(argv)
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            argv[i + 1] = resolve_config_path(argv[i + 1])
        elif a.startswith("--config="):
            argv[i] = "--config=" + resolve_config_path(a.split("=", 1)[1])
    return argv


def _flag_values(argv: list[str], extra=None) -> flags.FlagValues:
    fv = flags.FlagValues()
    # sys_argv: config_flags registers the `--config.x` override flags from the argv it is given.
    config_flags.DEFINE_config_file("config", None, "configs/NAME.py:VARIANT", flag_values=fv,
                                    lock_config=False, sys_argv=argv)
    for name, (kind, default, help_) in (extra or {}).items():
        getattr(flags, f"DEFINE_{kind}")(name, default, help_, flag_values=fv)
    return fv


def _config_spec(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return ""


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
    """[(dotted key, value)] of the `--config.KEY=VALUE` (or `--config.KEY VALUE`) arguments."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith("--config."):
            key, sep, value = a[len("--config."):].partition("=")
            out.append((key, value if sep else (argv[i + 1] if i + 1 < len(argv) else "")))
    return out


def _explain_failure(error: Exception, argv: list[str]) -> ConfigError:
    """Which part of `argv` made ml_collections fail: the file itself, an unknown field or a bad value.

    ml_collections reports these as a bare AttributeError / "invalid literal for int()" without the file or
    the field; re-parsing the pieces one at a time (only on failure) finds the culprit.
    """
    spec = _config_spec(argv)
    try:
        base = _load_spec(spec)
    except Exception as e:  # the file, its variant or its get_config is broken: say which file
        return ConfigError(f"{spec}: {_root_cause(e)}")
    return _explain_overrides(error, base, _overrides(argv), spec, lambda o: _load_spec(spec, [o]))


def _explain_overrides(error, base: ConfigDict, overrides, source: str, apply_one) -> ConfigError:
    """The first of `overrides` [(key, value)] that names no field of `base` or that `apply_one` refuses."""
    for key, value in overrides:
        if not _has_field(base, key):
            listing = f"; `jaxboost config show {source}` lists every field" if ".py" in source else ""
            return ConfigError(f"{source}: unknown config field {key!r}{_close_matches(base, key)}{listing}")
        try:
            apply_one(f"--config.{key}={value}")
        except Exception:
            return ConfigError(f"{source}: --config.{key}={value!r}: {_expected(base, key)}")
    return ConfigError(f"{source}: {_root_cause(error)}")


def override_config(config: ConfigDict, overrides: list[str], source: str) -> ConfigDict:
    """A copy of `config` with `overrides` (`--config.KEY=VALUE` or `KEY=VALUE`) applied, parsed and typed
    as on `jaxboost train`; errors name `source` (where `config` came from, e.g. W/config.json).
    Lists become tuples first: a config read back from JSON has lists where the file had tuples, and
    ml_collections overrides tuples only."""
    argv = ["jaxboost", *(o if o.startswith("--config.") else f"--config.{o}" for o in overrides)]
    config = ConfigDict(_lists_to_tuples(config.to_dict()))

    def apply(argv_):
        fv = flags.FlagValues()
        config_flags.DEFINE_config_dict("config", ConfigDict(config.to_dict()), flag_values=fv, lock_config=False,
                                        sys_argv=argv_)
        fv(argv_)
        return fv.config
    try:
        return apply(argv)
    except PARSE_ERRORS as e:
        if isinstance(e, flags.UnrecognizedFlagError):
            raise ValueError(f"{source}: {e}") from None
        raise _explain_overrides(e, config, _overrides(argv), source, lambda o: apply(["jaxboost", o])) from None


def _lists_to_tuples(tree):
    if isinstance(tree, dict):
        return {k: _lists_to_tuples(v) for k, v in tree.items()}
    return tuple(_lists_to_tuples(v) for v in tree) if isinstance(tree, (list, tuple)) else tree


def _load_spec(spec: str, overrides: list[str] = ()) -> ConfigDict:
    argv = ["jaxboost", f"--config={spec}", *overrides]
    fv = _flag_values(argv)
    _parse(fv, argv)
    return fv.config


def _parse(fv: flags.FlagValues, argv: list[str]) -> list[str]:
    # ml_collections loads the file as module "config_config" with SourceFileLoader.load_module, which
    # re-executes into the module already in sys.modules: a name the new file lacks (even get_config)
    # would survive from the config loaded before it in this process.
    sys.modules.pop("config_config", None)
    return fv(argv)


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    if isinstance(error, ConfigError):
        return str(error)
    if isinstance(error, SyntaxError):
        return f"syntax error on line {error.lineno}: {error.msg}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return "the file defines no get_config(arg) function"
    message = error.args[0] if isinstance(error, KeyError) and error.args else error
    return f"{type(error).__name__}: {message}"


def _field(config: ConfigDict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _has_field(config: ConfigDict, key: str) -> bool:
    try:
        _field(config, key)
        return True
    except (KeyError, AttributeError, TypeError):
        return False


def flat_fields(config: ConfigDict, prefix: str = "") -> dict:
    """{"optim.lr": 3e-3, ...}: every leaf field of `config` under its dotted name."""
    out = {}
    for name, value in config.items():
        if isinstance(value, ConfigDict) and len(value):
            out.update(flat_fields(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def _close_matches(config: ConfigDict, key: str) -> str:
    names = list(flat_fields(config))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    close += [n for n in names if n.rsplit(".", 1)[-1] == leaf and n not in close]
    return f" (did you mean {', '.join(close)}?)" if close else ""


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple such as '(1, 2)'"}


def _expected(config: ConfigDict, key: str) -> str:
    current = _field(config, key)
    if current is None:
        return (f"field {key} is None in this config, so its type is unknown and the command line cannot set it; "
                "edit the config file")
    if isinstance(current, ConfigDict):
        fields = ", ".join(list(flat_fields(current, f"{key}."))[:4])
        return f"{key} is a group of fields ({fields}, ...); set one as --config.{key}.FIELD=VALUE"
    kind = next((w for t, w in _TYPE_WORDS.items() if isinstance(current, t)), type(current).__name__)
    return f"field {key} expects {kind} (it is {current!r})"


def flags_help(extra: dict[str, tuple[str, str | None, str]] | None = None) -> str:
    lines = ["  --config configs/NAME.py:VARIANT   config file and variant (e.g. configs/sdm.py:tiny)",
             "  --config.KEY=VALUE                 override any config field (typed, nested with dots)"]
    for name, (_, default, help_) in (extra or {}).items():
        lines.append(f"  --{name:<32} {help_} (default: {default})")
    return "\n".join(lines)


def variant(arg: str | None, known: tuple[str, ...], default: str | None = None) -> str:
    """The variant string of `get_config(arg)`, checked against the config's known variants.

    No variant (`configs/x.py` without `:VARIANT`) is refused unless the config names a `default`:
    silently training `tiny` when `full` was meant costs a whole run.
    """
    arg = arg or default
    if not arg:
        raise ConfigError(f"no config variant given; append one of :{', :'.join(known)} to the file name")
    if arg not in known:
        raise ConfigError(f"unknown config variant {arg!r}; choose one of {', '.join(known)}")
    return arg

