"""Convergence: synthetic pretrain -> real finetune vs real only (jaxboost's definition of the paper's claim,
`demo.convergence_speedup`), epochs and wall time to 99% of the real-only best validation Dice, for
CLIPSeg (and CRIS outside --quick), over seeds, mean and spread. Runs the demo's own stages on the phantom.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from jaxboost import demo

PAPER = {"clipseg": 1.71, "cris": 4.55}


def run(quick: bool = False, out: str | None = None):
    seeds = [0] if quick else [0, 1, 2]
    models = ["clipseg"] if quick else ["clipseg", "cris"]
    root = Path(out or tempfile.mkdtemp(prefix="jaxboost_convergence_"))
    per_model: dict[str, list[dict]] = {m: [] for m in models}
    for seed in seeds:
        args = argparse.Namespace(out=str(root / f"seed{seed}"), seed=seed, camus=None,
                                  patients=16 if quick else 30, per_mask=1 if quick else 2,
                                  sampler_steps=10 if quick else 25, guidance=1.5,
                                  sdm_steps=60 if quick else 0, epochs=3 if quick else 0, models=",".join(models))
        o = Path(args.out)
        size = demo.config_lib.load_config(f"{models[0]}.py:tiny").data.size
        real = demo.stage_data(o, args, size)
        synthetic = demo.stage_synth(o, demo.stage_sdm(o, real, args), real, args)
        for m in models:
            res = demo.stage_segmenter(o, m, real, synthetic, args)
            spe = lambda r: r["summary"].get("steps_per_epoch", 1)
            conv = demo.convergence_speedup(res["real"]["summary"]["evals"], res["pretrain_finetune"]["summary"]["evals"],
                                            "val/dice_mean", spe(res["real"]), spe(res["pretrain_finetune"]))
            conv["test_dice"] = {k: v["test"].get("test/dice_mean") for k, v in res.items()}
            per_model[m].append(conv)
    rows, extra = [], {"per_seed": per_model, "paper": PAPER}
    lines = ["| model | seeds | speed-up (epochs) mean ± sd | speed-up (wall) | paper | test Dice real / synth / ft |",
             "|---|---|---|---|---|---|"]
    for m, convs in per_model.items():
        ep = [c["speedup_epochs"] for c in convs if c["speedup_epochs"]]
        wall = [c["speedup_wall"] for c in convs if c["speedup_wall"]]
        dice = np.array([[c["test_dice"][r] for r in demo.REGIMES] for c in convs], float)
        lines.append(f"| {m} | {len(convs)} | {np.mean(ep) if ep else float('nan'):.2f} ± "
                     f"{np.std(ep) if ep else float('nan'):.2f} (reached {len(ep)}/{len(convs)}) | "
                     f"{np.mean(wall) if wall else float('nan'):.2f} | {PAPER[m]} | "
                     + " / ".join(f"{v:.1f}" for v in dice.mean(0)) + " |")
        extra[m] = {"speedup_epochs": ep, "speedup_wall": wall, "test_dice_mean": dice.mean(0).tolist()}
    extra["table"] = "\n".join(lines)
    return rows, extra
