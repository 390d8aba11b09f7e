"""`jaxboost demo`: the whole Synthetic Boost pipeline on the echo phantom (or CAMUS), with a report.

phantom -> real corpus -> scarce real corpus (the labels of a few training patients; validation and test
whole) -> tiny SDM trained on the scarce images -> synthetic corpus (`--per-mask` images per scarce mask; the
paper augments each real mask 5x) -> for each segmenter and seed: real only, synthetic only, synthetic
pretrain -> real finetune -> Dice table over seeds, convergence speed-up, report folder:
  report.md, report.json, samples.png (synthetic triplets), overlays_<model>.png, curves_<model>.png.
Every stage writes into --out and is skipped when its output is complete, so a killed demo resumes.
Stage times are wall and process CPU seconds (CPU time moves less than wall time on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from jaxboost import config as config_lib
from jaxboost import plots, registry

REGIMES = ("real", "synthetic", "pretrain_finetune")
MODELS = ("clipseg", "cris")
STAGE_CONFIGS = ("sdm", *MODELS, "clip_towers")
METRIC = "val/dice_mean"


# ------------------------------------------------------------------------------------------ convergence

def epochs_to_reach(evals: list[dict], metric: str, target: float, steps_per_epoch: int):
    """First (epoch, wall_s) at which `metric` >= target, or (None, None) if never."""
    for e in evals:
        if e.get(metric, float("-inf")) >= target:
            return e["step"] / steps_per_epoch, e.get("wall_s")
    return None, None


def convergence_speedup(real_evals: list[dict], finetune_evals: list[dict], metric: str,
                        steps_per_epoch_real: int, steps_per_epoch_ft: int, level: float = 0.99) -> dict:
    """Synthetic Boost's convergence speed-up: epochs (and wall time) for the finetune to reach `level` x
    the real-only run's best validation Dice, divided into the real-only run's epochs to the same level.
    The wall-time figure is for runs that had the machine alike (time_to_dice); the demo's pipelined runs
    did not, and its report gives the epochs only."""
    best = max(e[metric] for e in real_evals)
    target = level * best
    ep_real, t_real = epochs_to_reach(real_evals, metric, target, steps_per_epoch_real)
    ep_ft, t_ft = epochs_to_reach(finetune_evals, metric, target, steps_per_epoch_ft)
    return {"target": target, "real_best": best, "epochs_real": ep_real, "epochs_finetune": ep_ft,
            "wall_real": t_real, "wall_finetune": t_ft,
            "speedup_epochs": (ep_real / ep_ft) if ep_ft else None,
            "speedup_wall": (t_real / t_ft) if (t_ft and t_real) else None}


def spread(values) -> dict:
    """mean and sample sd (ddof 1; 0 for one value) of the finite values, and how many there were."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if not v.size:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def fmt_value(v, spec: str = ".2f", suffix: str = "") -> str:
    """A figure, or "not reached" (no suffix) when there is none."""
    return "not reached" if v is None else f"{v:{spec}}{suffix}"


def fmt_speedup(s: dict) -> str:
    """A speed-up's spread over the seeds whose finetune reached the target, or "not reached in any seed"."""
    if s["mean"] is None:
        return "not reached in any seed"
    return f"{s['mean']:.2f} ± {s['sd']:.2f}x over the {s['n']} seed{'s' if s['n'] > 1 else ''} that reached it"


def fmt_spread(s: dict, spec: str = ".1f") -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:{spec}} ± {s['sd']:{spec}}"


# ------------------------------------------------------------------------------------------ stages

def _done(path: Path) -> bool:
    return (path / "DONE").exists()


def _mark(path: Path, info: dict | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "DONE").write_text(json.dumps(info or {}, default=float))


class Stopwatch:
    """Wall and process CPU seconds of a `with` block, added to timings[name]."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.wall, self.cpu = time.time(), time.process_time()
        return self

    def __exit__(self, *exc):
        t = self.timings.setdefault(self.name, {"wall_s": 0.0, "cpu_s": 0.0})
        t["wall_s"] += time.time() - self.wall
        t["cpu_s"] += time.process_time() - self.cpu


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


def scarce_patients(real: Path, patients: int) -> list[str]:
    """The first `patients` training patients of the corpus (sorted ids; 0 or more than there are: all)."""
    from jaxboost.data import corpus as corpus_lib
    ids = sorted({r["patient"] for r in corpus_lib.open_corpus(real).iter("train", arrays=False)})
    return ids if patients <= 0 else ids[:patients]


def stage_scarce(out: Path, real: Path, patients: int) -> Path:
    """The labelled real data the finetune and the SDM see: `patients` training patients (chosen by id,
    before anything is trained), validation and test whole. Returns `real` itself when that is all of it."""
    from jaxboost.data import corpus as corpus_lib
    keep = set(scarce_patients(real, patients))
    source = corpus_lib.open_corpus(real)
    if len(keep) == len(scarce_patients(real, 0)):
        return real
    scarce = out / "data" / f"real_{len(keep)}p"
    if not (scarce / "manifest.json").exists():
        records = [r for split in corpus_lib.SPLITS for r in source.iter(split)
                   if split != "train" or r["patient"] in keep]
        corpus_lib.build_corpus(records, scarce, size=source.size, source=records[0]["source"],
                                source_info={**source.manifest.get("source", {}), "train_patients": sorted(keep)})
    return scarce


def parse_sets(items: list[str]) -> dict:
    """--set MODEL.key=value (MODEL: sdm, clipseg, cris, clip_towers) -> {MODEL: {key: value}}; values as JSON
    when they parse (numbers, booleans, lists), else strings."""
    sets = {name: {} for name in STAGE_CONFIGS}
    for item in items or []:
        target, sep, value = item.partition("=")
        name, dot, key = target.partition(".")
        if not sep or not dot or name not in sets or not key:
            raise ValueError(f"--set {item!r}: expected MODEL.key=value with MODEL one of {STAGE_CONFIGS}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        sets[name][key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return sets


def _config(name: str, variant: str, overrides: dict):
    cfg = config_lib.load_config(f"configs/{name}.py:{variant}")
    unknown = sorted(set(overrides) - set(config_lib.flat_fields(cfg)))
    if unknown:
        raise ValueError(f"configs/{name}.py:{variant} has no field {unknown[0]!r} (from --set or a demo flag)")
    cfg.update_from_flattened_dict(overrides)
    return cfg


def sdm_config(args, corpus: Path):
    overrides = {"data.corpus": str(corpus), "seed": args.seed}
    if args.sdm_steps:
        # one checkpoint at the end and no sample grid (the grids are the stage's slowest part on a CPU; the
        # report draws samples.png from the synthetic corpus; --set sdm.eval_every=N brings them back)
        overrides.update({"total_steps": args.sdm_steps, "eval_every": 0, "ckpt_every": args.sdm_steps})
    if args.sdm_batch_size:
        overrides["batch_size"] = args.sdm_batch_size
    return _config("sdm", args.sdm_variant, {**overrides, **args.sets["sdm"]})


def stage_sdm(out: Path, corpus: Path, args) -> Path:
    workdir = out / "sdm"
    if not _done(workdir):
        cfg = sdm_config(args, corpus)
        registry.trainer(cfg.trainer).train(cfg, str(workdir))
        _mark(workdir)
    return workdir


def stage_synth(out: Path, sdm_dir: Path, masks: Path, args) -> Path:
    from jaxboost import synth
    synth_dir = out / "data" / "synthetic"
    if not (synth_dir / "manifest.json").exists():
        # train only: the synthetic-only run validates on the real validation split
        synth.generate(checkpoint=str(sdm_dir), masks=str(masks), out=str(synth_dir), per_mask=args.per_mask,
                       sampler=args.sampler, steps=args.sampler_steps, guidance=args.guidance, seed=args.seed,
                       splits=("train",))
    return synth_dir


def wants_towers(args, models) -> bool:
    """Pretrain CLIPSeg's towers (--towers contrastive) unless a converted CLIP is given."""
    return "clipseg" in models and args.towers == "contrastive" and not args.sets["clipseg"].get("pretrained")


def stage_towers(out: Path, real: Path, args) -> Path:
    """CLIPSeg's CLIP towers, contrastively pretrained on the scarce real training split's region/caption
    pairs (configs/clip_towers.py:demo); every CLIPSeg run then freezes them, as CLIPSeg freezes CLIP. Real
    only: the real-only and the finetune regimes start from the same towers, and no synthetic image reaches
    the real-only run through them."""
    workdir = out / "towers"
    if not _done(workdir):
        cfg = _config("clip_towers", "demo", {"data.corpus": str(real), "seed": args.seed,
                                              "segmenter": f"configs/clipseg.py:{args.variant}",
                                              **args.sets["clip_towers"]})
        # the towers of the very config the CLIPSeg runs train (--variant, --set clipseg.*)
        segmenter = segmenter_config(args, "clipseg", args.seed, {})
        info = registry.trainer(cfg.trainer).train(cfg, str(workdir), segmenter=segmenter)
        _mark(workdir, info)
    args.tower_overrides = tower_overrides(workdir)
    return workdir


def tower_overrides(workdir: Path) -> dict:
    """The CLIPSeg config fields that freeze the towers trained in `workdir`."""
    return {"pretrained": str(workdir / "towers"), "data.tokenizer": str(workdir / "tokenizer")}


def segmenter_config(args, model: str, seed: int, regime_overrides: dict, pretrain: bool = False):
    overrides = {"seed": seed}
    if model == "clipseg":
        overrides.update(getattr(args, "tower_overrides", {}))
    epochs = args.pretrain_epochs if pretrain and args.pretrain_epochs else args.epochs
    if epochs:
        overrides["num_epochs"] = epochs
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    return _config(model, args.variant, {**overrides, **args.sets[model], **regime_overrides})


def stage_segmenter(out: Path, model: str, real: Path, synthetic: Path, args, seed: int,
                    regimes=REGIMES) -> dict:
    """One seed's `regimes` (in order); the finetune starts from this seed's synthetic-only run."""
    results = {}
    root = out / model / f"seed{seed}"
    plan = {
        "real": {"data.corpus": str(real)},
        "synthetic": {"data.corpus": str(synthetic), "data.eval_corpus": str(real)},
        "pretrain_finetune": {"data.corpus": str(real), "init_from": str(root / "synthetic")},
    }
    for regime in regimes:
        workdir = root / regime
        cfg = segmenter_config(args, model, seed, plan[regime], pretrain=regime == "synthetic")
        if not _done(workdir):
            t, c = time.time(), time.process_time()
            summary = registry.trainer(cfg.trainer).train(cfg, str(workdir))
            _mark(workdir, {"summary": summary, "wall_s": time.time() - t, "cpu_s": time.process_time() - c})
        info = json.loads((workdir / "DONE").read_text())
        test = info.get("test")
        if test is None:   # read once: a resumed demo reports the stored figures without recompiling
            test = registry.trainer(cfg.trainer).evaluate(cfg, str(workdir), "test")
            _mark(workdir, {**info, "test": test})
        results[regime] = {"summary": info["summary"], "test": test, "wall_s": info["wall_s"],
                           "cpu_s": info.get("cpu_s")}
    return results


def setup_cache(out: Path) -> None:
    """jax's persistent compilation cache in out/xla_cache ($JAX_COMPILATION_CACHE_DIR, when set, wins)."""
    from jaxboost import parallel
    parallel.setup_compilation_cache(os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(out / "xla_cache"))


def segmenter_task(out: Path, model: str, real: Path, synthetic: Path, args, seed: int,
                   regimes: tuple[str, ...]) -> tuple[dict, dict]:
    """One seed's `regimes` of one segmenter in a worker process: (results, its wall and CPU seconds)."""
    setup_cache(out)
    timings = {}
    with Stopwatch(timings, model):
        results = stage_segmenter(out, model, real, synthetic, args, seed, regimes)
    return results, timings[model]


def towers_task(out: Path, real: Path, args) -> tuple[Path, dict]:
    """The towers in a worker process: (their folder, its wall and CPU seconds)."""
    setup_cache(out)
    timings = {}
    with Stopwatch(timings, "towers"):
        workdir = stage_towers(out, real, args)
    return workdir, timings["towers"]


def _pipeline_stages(out, models, real, synthetic, args, timings, pool, submit, futures, needs_towers) -> dict:
    """`pipelined`'s order. Queued first: CLIPSeg's towers, if it needs them, and the real-only runs that
    need nothing else (CRIS's), so they train while this process trains the SDM and samples the synthetic
    corpus; CLIPSeg's real-only runs are queued once the towers exist, and each seed's synthetic -> finetune
    pair once the synthetic corpus does (the longer runs first). Collects the workers' results."""
    import concurrent.futures
    seeds = range(args.seed, args.seed + args.seeds)
    later = [m for m in models if needs_towers(m)]
    towers = pool.submit(towers_task, out, real, args) if later else None
    for m in models:
        if m not in later:
            for seed in seeds:
                submit(m, seed, ("real",))

    def queue_after_towers():
        workdir, timings["towers"] = towers.result()
        args.tower_overrides = tower_overrides(workdir)
        for m in later:
            for seed in seeds:
                submit(m, seed, ("real",))

    with concurrent.futures.ThreadPoolExecutor(1) as waiter:
        queued = waiter.submit(queue_after_towers) if towers else None
        with Stopwatch(timings, "sdm"):
            sdm_dir = stage_sdm(out, real, args)
        with Stopwatch(timings, "synth"):
            stage_synth(out, sdm_dir, real, args)
        if queued:
            queued.result()   # the towers' failure, if they failed, stops the demo here
    # CRIS's pair takes longer than CLIPSeg's: queued first, the last worker to finish waits less
    for seed in seeds:
        for m in sorted(models, key=lambda m: m != "cris"):
            submit(m, seed, ("synthetic", "pretrain_finetune"))
    all_results = {m: {seed: {} for seed in seeds} for m in models}
    for m, seed, future in futures:
        results, t = future.result()
        all_results[m][seed].update(results)
        total = timings.setdefault(m, {"wall_s": 0.0, "cpu_s": 0.0})
        total["wall_s"] += t["wall_s"]
        total["cpu_s"] += t["cpu_s"]
    return all_results


def pipelined(out: Path, models: list[str], real: Path, args, timings: dict) -> tuple[dict, Path]:
    """The stages as the DAG they are, on `args.jobs` spawned worker processes beside this one.

    Real-only runs need only the scarce real corpus (CLIPSeg's also its towers), so they and the towers
    train in the workers while this process trains the SDM and samples the synthetic corpus, the path
    every synthetic run waits on; each seed's synthetic-only -> finetune pair follows once the synthetic
    corpus is there. Run alone, each stage keeps ~1.2-1.5 of 2 cores busy (short steps, evaluation and host
    work between them): side by side they fill the cores. The workers run at a lower priority
    (`--worker-nice`): at equal priority, on a 2-core Zen 3 EPYC, the SDM's steps (the path every
    synthetic run waits on) took 9.4 s beside the workers against 3.7 s alone, and the real-only runs
    finished early and left the workers waiting; niced, 4.9 s and a 5% shorter demo (acca97f -> e617d03).
    A run's result does not depend on what runs beside it: same programs, same data order, same seeds;
    only its wall time does. Every run is its own resumable stage (its DONE file), as in the sequential
    order."""
    import concurrent.futures
    import multiprocessing
    from jaxboost import parallel
    synthetic = out / "data" / "synthetic"
    futures = []
    needs_towers = lambda m: m == "clipseg" and wants_towers(args, models)
    # wall: from the first queued run to the last result (towers, SDM and synthetic corpus included)
    with Stopwatch(timings, "segmenters (pipelined)"), parallel.worker_env(), \
            concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs,
                                                   mp_context=multiprocessing.get_context("spawn"),
                                                   initializer=os.nice, initargs=(args.worker_nice,)) as pool:
        submit = lambda m, seed, regimes: futures.append(
            (m, seed, pool.submit(segmenter_task, out, m, real, synthetic, args, seed, regimes)))
        try:
            all_results = _pipeline_stages(out, models, real, synthetic, args, timings, pool, submit, futures,
                                           needs_towers)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)   # queued runs do not start after a failed stage
            raise
    # the regimes in their order; the stage's CPU is its workers' (this process's own is the stages above)
    all_results = {m: {seed: {r: per[r] for r in REGIMES} for seed, per in by_seed.items()}
                   for m, by_seed in all_results.items()}
    timings["segmenters (pipelined)"]["cpu_s"] = sum(timings[m]["cpu_s"] for m in models) + \
        timings.get("towers", {}).get("cpu_s", 0.0)
    return all_results, synthetic


# ------------------------------------------------------------------------------------------ figures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_curves(path: Path, model: str, per_seed: dict, convergence: dict) -> None:
    """Validation Dice by epoch: one colour per regime, one line per seed, the 99% target dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = dict(zip(REGIMES, ("tab:blue", "tab:orange", "tab:green")))
    for regime in REGIMES:
        for i, (seed, results) in enumerate(per_seed.items()):
            r = results[regime]
            spe = r["summary"].get("steps_per_epoch", 1)
            evals = r["summary"]["evals"]
            ax.plot([e["step"] / spe for e in evals], [e.get(METRIC, np.nan) for e in evals], marker=".",
                    color=colours[regime], alpha=0.85, label=regime.replace("_", " -> ") if i == 0 else None)
    targets = [c["target"] for c in convergence.values()]
    ax.axhline(float(np.mean(targets)), color="grey", ls="--", lw=1,
               label="99% of the real-only best (mean over seeds)")
    ax.set_xlabel("epoch (passes over the run's own training split)")
    ax.set_ylabel("validation Dice, mean of LV/MYO/LA (real images)")
    ax.set_title(f"{model}: validation Dice by regime ({len(per_seed)} seeds, one line each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def labelled_grid(path: Path, cells: list, cell_titles: list[str], title: str, xlabel: str, ylabel: str,
                  columns: int, cell_inches: float = 2.0) -> None:
    """Image cells in rows of `columns`, with a title, axis labels and a legend of the structure tints."""
    from matplotlib.patches import Patch
    plt = _pyplot()
    rows = -(-len(cells) // columns)
    h, w = np.shape(cells[0])[:2]
    cw, ch = cell_inches * w / max(h, w), cell_inches * h / max(h, w)
    fig, axes = plt.subplots(rows, columns, figsize=(cw * columns + 1.2, ch * rows + 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([]), ax.set_yticks([])
        if i >= len(cells):
            ax.axis("off")
            continue
        ax.imshow(cells[i], interpolation="nearest")
        ax.set_title(cell_titles[i], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.supxlabel(xlabel, fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    handles = [Patch(color=np.asarray(plots.STRUCTURE_COLOURS[s]) / 255, label=s) for s in ("LV", "MYO", "LA")]
    fig.legend(handles=handles, loc="upper right", fontsize=8, title="tint", title_fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 0.9 / (cw * columns + 1.2), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(path: Path, synthetic: Path, n: int = 6) -> None:
    """Synthetic images with the mask that conditioned them (one structure each) and their structure."""
    from jaxboost.data import corpus as corpus_lib
    source = corpus_lib.open_corpus(synthetic).source("train")
    idx = np.linspace(0, len(source) - 1, min(n, len(source))).astype(int)
    records = [source[int(i)] for i in idx]
    cells = [plots.overlay(r["image"], np.where(r["mask"] == r["label"], r["label"], 0)) for r in records]
    labelled_grid(path, cells, [r["structure"] for r in records],
                  "Synthetic triplets: SDM images drawn from real masks", "synthetic image (one per column)",
                  "image + conditioning mask", columns=len(cells))


def plot_overlays(path: Path, model: str, source_png: Path) -> None:
    """The trainer's overlay grid (image | ground truth | prediction rows) under the demo's title, labels
    and legend."""
    from PIL import Image
    with Image.open(source_png) as png:
        image = np.asarray(png.convert("RGB"))
    labelled_grid(path, [image], [""], f"{model}, synthetic pretrain -> real finetune, test split",
                  "image | ground truth | prediction", "test images (one per row)", columns=1,
                  cell_inches=max(image.shape[:2]) / 100)


# ------------------------------------------------------------------------------------------ report

def model_summary(per_seed: dict) -> dict:
    """Per-seed convergence and test Dice, their spreads, and the win counts of the finetune."""
    conv = {}
    for seed, results in per_seed.items():
        real, ft = results["real"]["summary"], results["pretrain_finetune"]["summary"]
        conv[seed] = convergence_speedup(real["evals"], ft["evals"], METRIC, real.get("steps_per_epoch", 1),
                                         ft.get("steps_per_epoch", 1))
    test = {regime: {k: spread([r[regime]["test"].get(f"test/dice_{k}") for r in per_seed.values()])
                     for k in ("mean", "LV", "MYO", "LA")} for regime in REGIMES}
    best_val = {regime: spread([r[regime]["summary"].get("best_metric") for r in per_seed.values()])
                for regime in REGIMES}
    faster = sum(c["epochs_finetune"] is not None and c["epochs_finetune"] < c["epochs_real"] for c in conv.values())
    wins = sum(r["pretrain_finetune"]["test"]["test/dice_mean"] >= r["real"]["test"]["test/dice_mean"]
               for r in per_seed.values())
    return {"convergence": conv, "test": test, "best_val": best_val, "faster_in": faster, "wins_in": wins,
            "seeds": len(per_seed),
            "speedup_epochs": spread([c["speedup_epochs"] for c in conv.values()]),
            "speedup_wall": spread([c["speedup_wall"] for c in conv.values()])}


def _model_lines(model: str, per_seed: dict, s: dict) -> list[str]:
    lines = [f"## {model} ({s['seeds']} seeds: mean ± sd)", "",
             "| regime | test Dice mean | LV | MYO | LA | best val Dice | train s (wall / CPU, per seed) |",
             "|---|---|---|---|---|---|---|"]
    for regime in REGIMES:
        t = s["test"][regime]
        wall = spread([r[regime]["wall_s"] for r in per_seed.values()])["mean"]
        cpu = spread([r[regime].get("cpu_s") for r in per_seed.values()])["mean"]
        lines.append(f"| {regime.replace('_', ' -> ')} | {fmt_spread(t['mean'])} | {fmt_spread(t['LV'])} | "
                     f"{fmt_spread(t['MYO'])} | {fmt_spread(t['LA'])} | {fmt_spread(s['best_val'][regime])} | "
                     f"{wall:.0f} / {fmt_value(cpu, '.0f')} |")
    lines += ["", "Convergence (epochs to 99% of the real-only run's best validation Dice, fresh optimizer):", ""]
    for seed, c in s["convergence"].items():
        lines.append(f"- seed {seed}: target {c['target']:.2f}; real only {fmt_value(c['epochs_real'], '.0f')} "
                     f"epochs, finetune {fmt_value(c['epochs_finetune'], '.0f')} -> speed-up "
                     f"{fmt_value(c['speedup_epochs'], '.2f', 'x')} in epochs; test Dice real only "
                     f"{per_seed[seed]['real']['test']['test/dice_mean']:.1f}, finetune "
                     f"{per_seed[seed]['pretrain_finetune']['test']['test/dice_mean']:.1f}")
    lines += ["", f"The finetune reaches the target in fewer epochs than real only in {s['faster_in']} of "
              f"{s['seeds']} seeds (speed-up {fmt_speedup(s['speedup_epochs'])} in epochs; paper: CLIPSeg "
              f"1.71x, CRIS 4.55x); its final "
              f"test Dice is no worse than real only (wins) in {s['wins_in']} of {s['seeds']}. No speed-up in "
              "time: the real-only runs train beside the SDM stage and the finetunes do not, so neither their "
              "wall nor their CPU seconds compare (report.json keeps both clocks of every evaluation; `benchmarks.run --cases "
              "time_to_dice` measures time to accuracy one run at a time).", ""]
    return lines


def write_report(out: Path, args, all_results: dict, timings: dict, data_info: dict) -> dict:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    lines = ["# jaxboost demo: Synthetic Boost on the " + ("CAMUS data" if args.camus else "echo phantom"), ""]
    if not args.camus:
        lines += ["All images are procedural phantoms, not patient data.", ""]
    lines += [f"Real labels for the finetune and the SDM: {data_info['train_patients']} training patients "
              f"({data_info['real_train']} records); synthetic corpus {data_info['synthetic_train']} records "
              f"({args.per_mask} per real mask). Validation {data_info['val']} / test {data_info['test']} "
              "records (real, whole). Models are chosen on validation; test is read once per run.", ""]
    done = {m: len(r) for m, r in all_results.items()}
    if any(n < args.seeds for n in done.values()):
        lines += [f"Partial report: seeds finished per model {done} of {args.seeds} requested.", ""]
    summary = {"timings": timings, "data": data_info, "models": {}}
    for model, per_seed in all_results.items():
        s = model_summary(per_seed)
        summary["models"][model] = {"per_seed": per_seed, **s}
        lines += _model_lines(model, per_seed, s)
        plot_curves(report / f"curves_{model}.png", model, per_seed, s["convergence"])
    lines += ["Stage times (wall / process CPU s): " +
              ", ".join(f"{k} {v['wall_s']:.0f} / {v['cpu_s']:.0f}" for k, v in timings.items()), "",
              "Figures: samples.png (synthetic triplets), curves_<model>.png, overlays_<model>.png."]
    (report / "report.md").write_text("\n".join(lines) + "\n")
    (report / "report.json").write_text(json.dumps(summary, indent=2, default=float))
    print("\n".join(lines))
    return summary


# ------------------------------------------------------------------------------------------ CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_out", help="output folder (resumes if it holds a demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the SDM and the first segmenter run")
    parser.add_argument("--seeds", type=int, default=3, help="segmenter seeds: seed, seed+1, ...")
    parser.add_argument("--models", default="clipseg,cris", help="comma-separated: clipseg, cris")
    parser.add_argument("--camus", default=None, help="a CAMUS folder to use instead of the phantom")
    # Defaults sized for ~15 minutes on 2 CPU cores; raise them on real hardware.
    parser.add_argument("--patients", type=int, default=20, help="phantom patients")
    parser.add_argument("--real-patients", type=int, default=None,
                        help="training patients whose labels the finetune and the SDM see (0: all; default 4 on "
                             "the phantom, all with --camus)")
    parser.add_argument("--per-mask", type=int, default=5, help="synthetic images per real mask (paper: 5)")
    # DPM-Solver++(2M) matched DDIM-50's label fidelity on the tiny SDM at 10 steps, a fifth of the model
    # calls (the README's SDM label fidelity table); 8 steps is 16 guided calls per image
    parser.add_argument("--sampler", default="dpmpp_2m", help="SDM sampler: dpmpp_2m, ddim or ddpm")
    parser.add_argument("--sampler-steps", type=int, default=8, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--variant", default="demo", help="segmenter config variant: demo, tiny or full")
    parser.add_argument("--sdm-variant", default="demo", help="SDM config variant: demo, tiny or full")
    parser.add_argument("--sdm-steps", type=int, default=0, help="SDM training steps (0: the config's)")
    parser.add_argument("--sdm-batch-size", type=int, default=0, help="SDM batch (0: the config's)")
    parser.add_argument("--epochs", type=int, default=0, help="segmenter epochs (0: the config's)")
    parser.add_argument("--pretrain-epochs", type=int, default=8,
                        help="epochs of the synthetic-only run (0: as --epochs; its epochs are 5x longer)")
    parser.add_argument("--batch-size", type=int, default=0, help="segmenter batch (0: the config's)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes for the segmenter runs, which train beside the towers, SDM and "
                             "synthetic stages (1: every stage one after the other)")
    parser.add_argument("--worker-nice", type=int, default=10,
                        help="niceness added to the worker processes, so the SDM and sampling stages, which "
                             "every synthetic run waits on, keep the cores they need (0: equal priority)")
    parser.add_argument("--towers", default="contrastive", choices=("contrastive", "random"),
                        help="CLIPSeg's frozen CLIP towers: contrastively pretrained on the scarce real "
                             "region/caption pairs, or random (ignored when clipseg.pretrained is set)")
    parser.add_argument("--set", action="append", default=[], metavar="MODEL.key=value",
                        help="any config field of sdm, clipseg, cris or clip_towers, e.g. clipseg.pretrained=DIR "
                             "(repeatable)")


def _check_args(args) -> list[str]:
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise ValueError(f"--models: unknown segmenter {m!r}; choose from {', '.join(MODELS)}")
    if not models:
        raise ValueError("--models: name at least one of clipseg, cris")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    if not 0 <= args.worker_nice <= 19:
        raise ValueError(f"--worker-nice must be in 0..19, got {args.worker_nice}")
    if args.per_mask < 1:
        raise ValueError(f"--per-mask must be at least 1, got {args.per_mask}")
    if args.camus and not Path(args.camus).is_dir():
        raise FileNotFoundError(f"--camus {args.camus}: no such folder")
    args.sets = parse_sets(args.set)
    if args.real_patients is None:
        args.real_patients = 0 if args.camus else 4
    return models


def plot_samples_and_count(out: Path, real: Path, synthetic: Path) -> dict:
    """samples.png from the synthetic corpus, and the corpus sizes the report states."""
    from jaxboost.data import corpus as corpus_lib
    (out / "report").mkdir(exist_ok=True)
    plot_samples(out / "report" / "samples.png", synthetic)
    real_corpus, synth_corpus = corpus_lib.open_corpus(real), corpus_lib.open_corpus(synthetic)
    return {"train_patients": len(scarce_patients(real, 0)), "real_train": real_corpus.split_len("train"),
            "synthetic_train": synth_corpus.split_len("train"), "val": real_corpus.split_len("val"),
            "test": real_corpus.split_len("test")}


def main(args) -> int:
    models = _check_args(args)
    for m in models:  # a bad variant or field fails here, before any stage runs
        segmenter_config(args, m, args.seed, {})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every seed and regime of a segmenter compiles the same programs: jax's persistent cache compiles
    # each once per demo folder ($JAX_COMPILATION_CACHE_DIR, when set, wins).
    setup_cache(out)
    size = int(sdm_config(args, out).data.size)  # the synthetic corpus is at the SDM's size; real matches it
    timings = {}
    with Stopwatch(timings, "data"):
        real = stage_scarce(out, stage_data(out, args, size), args.real_patients)
    if args.jobs > 1:
        all_results, synthetic = pipelined(out, models, real, args, timings)
        data_info = plot_samples_and_count(out, real, synthetic)
    else:
        with Stopwatch(timings, "sdm"):
            sdm_dir = stage_sdm(out, real, args)
        with Stopwatch(timings, "synth"):
            synthetic = stage_synth(out, sdm_dir, real, args)
        if wants_towers(args, models):
            with Stopwatch(timings, "towers"):
                stage_towers(out, real, args)
        data_info = plot_samples_and_count(out, real, synthetic)
        all_results = {m: {} for m in models}
        for seed in range(args.seed, args.seed + args.seeds):
            for m in models:
                with Stopwatch(timings, m):
                    all_results[m][seed] = stage_segmenter(out, m, real, synthetic, args, seed)
            # rewritten after every seed, so a demo stopped early still reports the seeds it finished
            write_report(out, args, all_results, timings, data_info)
    for m in models:
        overlay = out / m / f"seed{args.seed}" / "pretrain_finetune" / "overlays_test.png"
        if overlay.exists():
            plot_overlays(out / "report" / f"overlays_{m}.png", m, overlay)
    write_report(out, args, all_results, timings, data_info)
    print(f"report: {out / 'report' / 'report.md'}")
    return 0
