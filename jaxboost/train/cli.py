"""`jaxboost train --config configs/NAME.py:VARIANT [--config.key=value ...] --workdir DIR`.

Multi-host: `--coordinator HOST:PORT --num_processes N --process_id I` (or the JAXBOOST_* / SLURM / TPU
environment) start jax.distributed before anything touches a device.
"""
from __future__ import annotations

import logging
import sys

from jaxboost import config as config_lib
from jaxboost import parallel, registry

RAW_ARGV = True
FLAGS = {
    "workdir": ("string", None, "run directory: checkpoints, metrics, samples (resumes if it holds a run)"),
    "coordinator": ("string", None, "jax.distributed coordinator HOST:PORT (multi-process runs)"),
    "num_processes": ("integer", None, "number of processes (multi-process runs)"),
    "process_id": ("integer", None, "this process's index (multi-process runs)"),
}


def parse(argv: list[str], extra=None):
    flags_ = dict(FLAGS, **(extra or {}))
    if not argv or "--help" in argv or "-h" in argv:
        print(f"usage: jaxboost {__name__.rsplit('.', 1)[-1].replace('cli_', '').replace('cli', 'train')} "
              f"--config configs/NAME.py:VARIANT --workdir DIR [--config.KEY=VALUE ...]\n\n"
              + config_lib.flags_help(flags_))
        sys.exit(0)
    config, values = config_lib.parse_flags(["jaxboost"] + argv, flags_)
    if not values["workdir"]:
        raise SystemExit("--workdir DIR is required")
    parallel.initialize_distributed(values["coordinator"], values["num_processes"], values["process_id"])
    return config, values


def summary_line(summary: dict) -> str:
    """One readable line for the end of a run (the whole summary is in W/run.json and W/metrics.jsonl)."""
    parts = [f"trained steps {summary.get('start_step', 0)}-{summary.get('final_step')}"]
    if summary.get("wall_s") is not None:
        parts.append(f"in {summary['wall_s']:.0f} s")
    if summary.get("best_metric") is not None:
        parts.append(f"best {summary.get('best_name') or 'metric'} {summary['best_metric']:.4f} at step "
                     f"{summary.get('best_step')}")
    last = summary.get("last_train") or {}
    if "loss" in last:
        parts.append(f"last train loss {last['loss']:.4f}")
    return "[jaxboost] " + ", ".join(parts)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config, values = parse(argv)
    trainer = registry.trainer(config.trainer)
    summary = trainer.train(config, values["workdir"])
    if summary and parallel.is_main_process():
        print(summary_line(summary), flush=True)
    return 0
