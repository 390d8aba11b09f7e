"""`jaxboost` command line: one entry point, each subcommand handed to the module that owns it.

A subcommand module exposes `add_arguments(parser)` and `main(args)` (or `RAW_ARGV = True` and
`main(argv)` when it parses its own flags); it is imported only when chosen, so `jaxboost phantom` never
pays for importing torch or the models. `train` and `eval` take big_vision style
`--config configs/NAME.py:VARIANT --config.key=value` flags, parsed by ml_collections.

Errors: bad input ends in one line `jaxboost: error: ...` and exit status 2, Ctrl-C in one line and 130;
`jaxboost --traceback COMMAND ...` or JAXBOOST_DEBUG=1 shows the traceback instead.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
import traceback

# (words, module, help). The module provides add_arguments(parser) and main(args).
SUBCOMMANDS = [
    (("phantom",), "jaxboost.data.phantom", "write a procedural echo phantom in the CAMUS layout"),
    (("corpus", "build"), "jaxboost.data.corpus_build", "build the sharded ArrayRecord triplet corpus"),
    (("corpus", "show"), "jaxboost.data.corpus_show", "print counts/examples of a corpus, draw a PNG grid"),
    (("corpus", "verify"), "jaxboost.data.corpus_verify", "re-check every shard's hash and count; name bad ones"),
    (("config", "show"), "jaxboost.config_show", "list every field of a config with its value"),
    (("train",), "jaxboost.train.cli", "train a model: --config configs/NAME.py:VARIANT --workdir DIR"),
    (("eval",), "jaxboost.train.cli_eval", "evaluate a trained workdir on a split"),
    (("synth",), "jaxboost.synth", "sample a synthetic triplet corpus from a trained SDM"),
    (("convert", "clipseg"), "jaxboost.convert.hf_clipseg", "HF CLIPSeg folder -> jaxboost params"),
    (("convert", "cris"), "jaxboost.convert.cris", "CRIS checkpoint + OpenAI CLIP -> jaxboost params"),
    (("convert", "sdm"), "jaxboost.convert.sdm", "SDM/guided-diffusion state dict -> jaxboost params"),
    (("convert", "bert"), "jaxboost.convert.bert", "HF BERT folder -> jaxboost params"),
    (("convert", "albef"), "jaxboost.convert.albef", "ALBEF/MUMC checkpoint -> jaxboost params"),
    (("convert", "mae"), "jaxboost.convert.mae", "MAE / timm ViT checkpoint -> jaxboost image encoder params"),
    (("export", "clipseg"), "jaxboost.export.clipseg", "CLIPSeg run or converted folder -> HF CLIPSeg folder"),
    (("export", "cris"), "jaxboost.export.cris", "CRIS run or converted folder -> CRIS.pytorch state dict"),
    (("export", "sdm"), "jaxboost.export.sdm", "SDM run -> guided-diffusion UNet state dict (safetensors)"),
    (("vqa", "build"), "jaxboost.data.echo_vqa", "build an echo-VQA set (VQA-RAD json) from a corpus"),
    (("demo",), "jaxboost.demo", "the whole Synthetic Boost pipeline on the phantom, with a report"),
    (("bench",), "benchmarks.run", "JAX vs PyTorch speed and convergence benchmarks"),
    (("bench", "compare"), "benchmarks.compare", "compare two benchmark results.json; non-zero on a slowdown"),
]
# Bad input, named by the message; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)
HELP = ("-h", "--help")


class UsageError(ValueError):
    """An unknown command; its message is the error line, `listing` the commands to choose from."""

    def __init__(self, message: str, listing: str):
        super().__init__(message)
        self.listing = listing


def version() -> str:
    from jaxboost import __version__
    return f"jaxboost {__version__}"


def _usage(prefix: tuple[str, ...] = ()) -> str:
    """The commands (under `prefix`, e.g. ("convert",)) with one line of help each."""
    name = " ".join(("jaxboost",) + prefix)
    lines = [f"usage: {name} COMMAND [options]   ({name} COMMAND --help for its options)", "", "commands:"]
    for words, _, help_ in SUBCOMMANDS:
        if words[: len(prefix)] == prefix:
            lines.append(f"  {' '.join(words):<16} {help_}")
    if not prefix:
        lines += ["", "options:", "  --version        print the version and exit",
                  "  --traceback      show the full traceback of an error (also JAXBOOST_DEBUG=1)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
    except BaseException:
        if not _several_processes():
            raise
        traceback.print_exc()
        code = 1
    if code and _several_processes():
        _leave_now(code)
    return code


def _several_processes() -> bool:
    if "jax" not in sys.modules:
        return False
    from jaxboost import parallel
    return parallel.several_processes()


def _leave_now(code: int) -> None:
    """A failed process of a multi-process run exits at once. Left to jax's atexit hook it would wait up to
    `shutdown_timeout_seconds` (300 s) at the shutdown barrier for peers that never come: they wait on this
    process in a collective. The launcher, or the coordination service's heartbeat, stops them."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("JAXBOOST_DEBUG", "") not in ("", "0")
    if argv[:1] == ["--traceback"]:
        argv, debug = argv[1:], True
    try:
        return _dispatch(argv)
    except UsageError as e:
        print(e.listing, file=sys.stderr)
        return _error(e)
    except KeyboardInterrupt:
        if debug:
            raise
        print("jaxboost: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `jaxboost ... | head`: the reader left; not an error of ours
        _silence_stdout()
        return 141
    except SystemExit as e:  # argparse's exits and modules' SystemExit("message") for bad input
        if isinstance(e.code, str) and not debug:
            return _error(e.code)
        if isinstance(e.code, int) or e.code is None:
            return e.code or 0
        raise
    except USER_ERRORS as e:
        if debug:
            raise
        return _error(e)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into the closed pipe raises nothing
    (the recipe of Python's signal docs)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (captured, redirected in-process)
        pass


def _error(error) -> int:
    """Print `error` as one `jaxboost: error: ...` line; exit status 2 (bad input, as argparse)."""
    message = " ".join(str(error).split())
    print(f"jaxboost: error: {message}", file=sys.stderr)
    return 2


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in HELP:
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(version())
        return 0
    for words, module_name, help_ in sorted(SUBCOMMANDS, key=lambda s: -len(s[0])):
        if tuple(argv[: len(words)]) == words:
            return _run(words, module_name, help_, argv[len(words):])
    groups = {words[0] for words, _, _ in SUBCOMMANDS if len(words) > 1}
    if argv[0] in groups:
        if argv[1:2] in (["-h"], ["--help"]):
            print(_usage((argv[0],)))
            return 0
        raise _unknown(argv[:2], (argv[0],))
    raise _unknown(argv[:1], ())


def _unknown(typed: list[str], prefix: tuple[str, ...]) -> UsageError:
    known = [" ".join(words) for words, _, _ in SUBCOMMANDS if words[: len(prefix)] == prefix]
    if typed == list(prefix):  # `jaxboost convert` alone
        return UsageError(f"'{typed[0]}' needs a command; choose one of: {', '.join(known)}", _usage(prefix))
    tails = {" ".join(words[len(prefix):]): " ".join(words) for words, _, _ in SUBCOMMANDS
             if words[: len(prefix)] == prefix}  # `convert foo` is compared with clipseg, cris, ... only
    close = difflib.get_close_matches(typed[-1], list(tails), n=1)
    hint = f" (did you mean '{tails[close[0]]}'?)" if close else ""
    return UsageError(f"unknown command '{' '.join(typed)}'{hint}; choose one of: {', '.join(known)}",
                      _usage(prefix))


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, except required flags and flags without one."""

    def _get_help_string(self, action):
        if action.required or any(action.default is d for d in (None, argparse.SUPPRESS, False)):
            return action.help
        return super()._get_help_string(action)


def _run(words: tuple[str, ...], module_name: str, help_: str, rest: list[str]) -> int:
    from jaxboost import parallel
    module = importlib.import_module(module_name)
    raw = getattr(module, "RAW_ARGV", False)
    # compilation cache + jax.distributed, for every command, before it touches a device
    rest = parallel.startup(rest, keep_config_flag=raw)
    if raw:  # trainers parse absl/ml_collections flags themselves
        code = int(module.main(rest) or 0)
    else:
        parser = argparse.ArgumentParser(prog="jaxboost " + " ".join(words), description=help_,
                                         formatter_class=_DefaultsHelpFormatter)
        module.add_arguments(parser)
        code = int(module.main(parser.parse_args(rest)) or 0)
    if code == 0:
        parallel.shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
