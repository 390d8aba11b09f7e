"""Convergence over seeds: `jaxboost demo` itself (its data, SDM, synthetic corpus and three regimes per
segmenter and seed), read back from its report.json: the synthetic pretrain -> real finetune speed-up
(`demo.convergence_speedup`: epochs and wall time to 99% of the real-only best validation Dice), mean ± sd
over seeds, how many seeds were faster, and the test Dice of each regime, beside the paper's figures.
--quick: one seed of CLIPSeg; else the demo's defaults (3 seeds, both segmenters; ~14 minutes on 2 quiet
cores). The single-seed comparison against PyTorch is `time_to_dice`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from jaxboost import demo

PAPER = {"clipseg": 1.71, "cris": 4.55}


def demo_args(out: Path, quick: bool) -> argparse.Namespace:
    """`jaxboost demo`'s arguments: its defaults, one seed of CLIPSeg with --quick."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args([f"--out={out}"] + (["--seeds=1", "--models=clipseg"] if quick else []))


def table(report: dict) -> str:
    """report.json's models -> one markdown row per segmenter."""
    lines = ["| model | seeds faster | speed-up (epochs) mean ± sd | speed-up (wall) | paper | "
             "test Dice real / synthetic / pretrain -> finetune |", "|---|---|---|---|---|---|"]
    for m, s in report["models"].items():
        dice = " / ".join(demo.fmt_spread(s["test"][r]["mean"]) for r in demo.REGIMES)
        lines.append(f"| {m} | {s['faster_in']} of {s['seeds']} | {demo.fmt_spread(s['speedup_epochs'], '.2f')} "
                     f"(reached in {s['speedup_epochs']['n']}) | {demo.fmt_spread(s['speedup_wall'], '.2f')} | "
                     f"{PAPER[m]}x | {dice} |")
    return "\n".join(lines)


def run(quick: bool = False, out: str | None = None):
    root = Path(out or tempfile.mkdtemp(prefix="jaxboost_convergence_"))
    demo.main(demo_args(root, quick))
    report = json.loads((root / "report" / "report.json").read_text())
    extra = {"paper": PAPER, "timings": report["timings"], "table": table(report),
             "models": {m: {k: s[k] for k in ("speedup_epochs", "speedup_wall", "faster_in", "wins_in", "seeds",
                                               "test", "convergence")} for m, s in report["models"].items()}}
    return [], extra
