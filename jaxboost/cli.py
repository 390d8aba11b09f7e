"""`jaxboost` command line: one entry point, each subcommand handed to the module that owns it.

A subcommand module exposes `add_arguments(parser)` and `main(args)`; it is imported only when chosen,
so `jaxboost phantom` never pays for importing torch or the models. `train` and `eval` take big_vision
style `--config configs/NAME.py:VARIANT --config.key=value` flags, parsed by ml_collections.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# (words, module, help). The module provides add_arguments(parser) and main(args).
SUBCOMMANDS = [
    (("phantom",), "jaxboost.data.phantom", "write a procedural echo phantom in the CAMUS layout"),
    (("corpus", "build"), "jaxboost.data.corpus_build", "build the sharded ArrayRecord triplet corpus"),
    (("corpus", "show"), "jaxboost.data.corpus_show", "print counts/examples of a corpus, draw a PNG grid"),
    (("train",), "jaxboost.train.cli", "train a model: --config configs/NAME.py:VARIANT --workdir DIR"),
    (("eval",), "jaxboost.train.cli_eval", "evaluate a trained workdir on a split"),
    (("synth",), "jaxboost.synth", "sample a synthetic triplet corpus from a trained SDM"),
    (("convert", "clipseg"), "jaxboost.convert.hf_clipseg", "HF CLIPSeg folder -> jaxboost params"),
    (("convert", "cris"), "jaxboost.convert.cris", "CRIS checkpoint + OpenAI CLIP -> jaxboost params"),
    (("convert", "sdm"), "jaxboost.convert.sdm", "SDM/guided-diffusion state dict -> jaxboost params"),
    (("convert", "bert"), "jaxboost.convert.bert", "HF BERT folder -> jaxboost params"),
    (("convert", "albef"), "jaxboost.convert.albef", "ALBEF/MUMC checkpoint -> jaxboost params"),
    (("export", "clipseg"), "jaxboost.export.clipseg", "CLIPSeg run or converted folder -> HF CLIPSeg folder"),
    (("export", "cris"), "jaxboost.export.cris", "CRIS run or converted folder -> CRIS.pytorch state dict"),
    (("export", "sdm"), "jaxboost.export.sdm", "SDM run -> guided-diffusion UNet state dict (safetensors)"),
    (("vqa", "build"), "jaxboost.data.echo_vqa", "build an echo-VQA set (VQA-RAD json) from a corpus"),
    (("demo",), "jaxboost.demo", "the whole Synthetic Boost pipeline on the phantom, with a report"),
    (("bench",), "benchmarks.run", "JAX vs PyTorch speed and convergence benchmarks"),
]


def _usage() -> str:
    lines = ["usage: jaxboost COMMAND [options]   (jaxboost COMMAND --help for its options)", "", "commands:"]
    for words, _, help_ in SUBCOMMANDS:
        lines.append(f"  {' '.join(words):<16} {help_}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Bad input (ValueError, FileNotFoundError, ...) ends with one clear line and exit status 2;
    JAXBOOST_TRACEBACK=1 shows the traceback instead."""
    try:
        return _dispatch(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, FloatingPointError,
            RuntimeError) as e:
        if os.environ.get("JAXBOOST_TRACEBACK"):
            raise
        print(f"jaxboost: error ({type(e).__name__}): {e}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, module_name, help_ in sorted(SUBCOMMANDS, key=lambda s: -len(s[0])):
        if tuple(argv[: len(words)]) == words:
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(prog="jaxboost " + " ".join(words), description=help_)
            rest = argv[len(words):]
            if getattr(module, "RAW_ARGV", False):  # trainers parse absl/ml_collections flags themselves
                return int(module.main(rest) or 0)
            module.add_arguments(parser)
            return int(module.main(parser.parse_args(rest)) or 0)
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
