"""`jaxboost demo`: the whole Synthetic Boost pipeline on the echo phantom (or CAMUS), with a report.

phantom -> real corpus -> tiny SDM -> synthetic corpus -> each segmenter three ways (real only, synthetic
only, synthetic pretrain -> real finetune) -> Dice table, convergence speed-up, report folder:
  report.md, report.json, samples.png (synthetic triplets), overlays_<model>.png, curves_<model>.png.
Every stage writes into --out and is skipped when its output is complete, so a killed demo resumes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from jaxboost import config as config_lib
from jaxboost import registry

REGIMES = ("real", "synthetic", "pretrain_finetune")


# ------------------------------------------------------------------------------------------ convergence

def epochs_to_reach(evals: list[dict], metric: str, target: float, steps_per_epoch: int):
    """First (epoch, wall_s) at which `metric` >= target, or (None, None) if never."""
    for e in evals:
        if e.get(metric, float("-inf")) >= target:
            return e["step"] / steps_per_epoch, e.get("wall_s")
    return None, None


def convergence_speedup(real_evals: list[dict], finetune_evals: list[dict], metric: str,
                        steps_per_epoch_real: int, steps_per_epoch_ft: int, level: float = 0.99) -> dict:
    """jaxboost's definition (SPEC A5): epochs (and wall time) for the finetune to reach `level` x the
    real-only run's best validation Dice, divided into the real-only run's epochs to the same level."""
    best = max(e[metric] for e in real_evals)
    target = level * best
    ep_real, t_real = epochs_to_reach(real_evals, metric, target, steps_per_epoch_real)
    ep_ft, t_ft = epochs_to_reach(finetune_evals, metric, target, steps_per_epoch_ft)
    return {"target": target, "real_best": best, "epochs_real": ep_real, "epochs_finetune": ep_ft,
            "speedup_epochs": (ep_real / ep_ft) if ep_ft else None,
            "speedup_wall": (t_real / t_ft) if (t_ft and t_real) else None}


# ------------------------------------------------------------------------------------------ stages

def _done(path: Path) -> bool:
    return (path / "DONE").exists()


def _mark(path: Path, info: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "DONE").write_text(json.dumps(info or {}, default=float))


def stage_data(out: Path, args, size: int) -> Path:
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import phantom
    real = out / "data" / "real"
    if (real / "manifest.json").exists():
        return real
    source_dir = Path(args.camus) if args.camus else out / "data" / "phantom"
    if not args.camus and not (source_dir / "PHANTOM.txt").exists():
        phantom.write_phantom(source_dir, patients=args.patients, seed=args.seed)
    items, info = corpus_lib.camus_items(source_dir, size=size, source="camus" if args.camus else "phantom")
    corpus_lib.build_corpus(items, real, size=size, source="camus" if args.camus else "phantom", source_info=info)
    return real


def _config(name: str, variant: str, overrides: dict):
    cfg = config_lib.load_config(f"{name}.py:{variant}")
    cfg.update_from_flattened_dict(overrides)
    return cfg


def stage_sdm(out: Path, real: Path, args) -> Path:
    workdir = out / "sdm"
    if not _done(workdir):
        cfg = _config("sdm", "tiny", {"data.corpus": str(real), "seed": args.seed,
                                      **({"total_steps": args.sdm_steps} if args.sdm_steps else {})})
        registry.trainer(cfg.trainer).train(cfg, str(workdir))
        _mark(workdir)
    return workdir


def stage_synth(out: Path, sdm_dir: Path, real: Path, args) -> Path:
    from jaxboost import synth
    synth_dir = out / "data" / "synthetic"
    if not (synth_dir / "manifest.json").exists():
        synth.generate(checkpoint=str(sdm_dir), masks=str(real), out=str(synth_dir), per_mask=args.per_mask,
                       sampler="ddim", steps=args.sampler_steps, guidance=args.guidance, seed=args.seed)
    return synth_dir


def stage_segmenter(out: Path, model: str, real: Path, synthetic: Path, args) -> dict:
    results = {}
    base = {"seed": args.seed, **({"num_epochs": args.epochs} if args.epochs else {})}
    plan = {
        "real": {"data.corpus": str(real)},
        "synthetic": {"data.corpus": str(synthetic), "data.eval_corpus": str(real)},
        "pretrain_finetune": {"data.corpus": str(real), "init_from": str(out / model / "synthetic")},
    }
    for regime in REGIMES:
        workdir = out / model / regime
        cfg = _config(model, "tiny", {**base, **plan[regime]})
        if not _done(workdir):
            t = time.time()
            summary = registry.trainer(cfg.trainer).train(cfg, str(workdir))
            _mark(workdir, {"summary": summary, "wall_s": time.time() - t})
        info = json.loads((workdir / "DONE").read_text())
        test = registry.trainer(cfg.trainer).evaluate(cfg, str(workdir), "test")
        results[regime] = {"summary": info["summary"], "test": test, "wall_s": info["wall_s"]}
    return results


# ------------------------------------------------------------------------------------------ report

def _plot_curves(path: Path, model: str, results: dict, metric: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for regime, r in results.items():
        evals = r["summary"]["evals"]
        spe = r["summary"].get("steps_per_epoch", 1)
        ax.plot([e["step"] / spe for e in evals], [e.get(metric, np.nan) for e in evals], marker="o", label=regime)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation Dice (real images)")
    ax.set_title(f"{model}: validation Dice by regime")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def write_report(out: Path, args, all_results: dict, timings: dict) -> dict:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    lines = ["# jaxboost demo: Synthetic Boost on the " + ("CAMUS data" if args.camus else "echo phantom"), ""]
    if not args.camus:
        lines += ["All images are procedural phantoms, not patient data.", ""]
    lines += ["| model | regime | test Dice (mean) | LV | MYO | LA | best val Dice | epochs | wall s |",
              "|---|---|---|---|---|---|---|---|---|"]
    summary = {"timings_s": timings, "models": {}}
    for model, results in all_results.items():
        metric = "val/dice_mean"
        for regime, r in results.items():
            t = r["test"]
            spe = r["summary"].get("steps_per_epoch", 1)
            lines.append(f"| {model} | {regime} | {t.get('test/dice_mean', float('nan')):.2f} | "
                         f"{t.get('test/dice_LV', float('nan')):.2f} | {t.get('test/dice_MYO', float('nan')):.2f} | "
                         f"{t.get('test/dice_LA', float('nan')):.2f} | {_num(r['summary'].get('best_metric')):.2f} | "
                         f"{r['summary']['final_step'] / spe:.0f} | {r['wall_s']:.0f} |")
        conv = convergence_speedup(results["real"]["summary"]["evals"], results["pretrain_finetune"]["summary"]["evals"],
                                   metric, results["real"]["summary"].get("steps_per_epoch", 1),
                                   results["pretrain_finetune"]["summary"].get("steps_per_epoch", 1))
        summary["models"][model] = {"results": results, "convergence": conv}
        _plot_curves(report / f"curves_{model}.png", model, results, metric)
    lines += ["", "Convergence speed-up (epochs for the finetune to reach 99% of the real-only best validation "
              "Dice, divided into the real-only run's epochs to that level; paper: CRIS 4.55x, CLIPSeg 1.71x):", ""]
    for model, m in summary["models"].items():
        c = m["convergence"]
        fmt = lambda v: "not reached" if v is None else f"{v:.2f}"
        lines.append(f"- {model}: {fmt(c['speedup_epochs'])}x in epochs ({fmt(c['epochs_real'])} vs "
                     f"{fmt(c['epochs_finetune'])}), {fmt(c['speedup_wall'])}x in wall time; target Dice "
                     f"{c['target']:.2f}")
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), "",
              "Figures: samples.png (synthetic triplets), curves_<model>.png, overlays_<model>.png."]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    (report / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n".join(lines))
    return summary


# ------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (resumes if it holds a demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", default="clipseg", help="comma-separated: clipseg, cris")
    parser.add_argument("--camus", default=None, help="a CAMUS folder to use instead of the phantom")
    # Defaults sized for ~15 minutes on 2 CPU cores; raise them on real hardware.
    parser.add_argument("--patients", type=int, default=20, help="phantom patients")
    parser.add_argument("--per-mask", type=int, default=1, help="synthetic images per real mask")
    parser.add_argument("--sampler-steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--sdm-steps", type=int, default=200, help="tiny SDM training steps (0: the config's)")
    parser.add_argument("--epochs", type=int, default=0, help="override the segmenters' epochs")


def main(args) -> int:
    from jaxboost.data import corpus_show
    from jaxboost.data import corpus as corpus_lib
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in ("clipseg", "cris"):
            raise SystemExit(f"--models: unknown segmenter {m!r}; choose from clipseg, cris")
    size = config_lib.load_config(f"{models[0]}.py:tiny").data.size
    timings = {}
    t = time.time(); real = stage_data(out, args, size); timings["data"] = time.time() - t
    t = time.time(); sdm_dir = stage_sdm(out, real, args); timings["sdm"] = time.time() - t
    t = time.time(); synthetic = stage_synth(out, sdm_dir, real, args); timings["synth"] = time.time() - t
    (out / "report").mkdir(exist_ok=True)
    corpus_show.draw_grid(corpus_lib.open_corpus(synthetic), str(out / "report" / "samples.png"), n=8)
    all_results = {}
    for m in models:
        t = time.time()
        all_results[m] = stage_segmenter(out, m, real, synthetic, args)
        timings[m] = time.time() - t
        overlay = out / m / "pretrain_finetune" / "overlays_test.png"
        if overlay.exists():
            shutil.copy(overlay, out / "report" / f"overlays_{m}.png")
    write_report(out, args, all_results, timings)
    print(f"report: {out / 'report' / 'report.md'}")
    return 0
