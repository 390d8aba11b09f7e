"""SDM label fidelity: do the samples show the structures of the masks that conditioned them, per sampler?

Trains the foundation U-Net segmenter (configs/unet_phantom.py:tiny) on phantom images and a tiny SDM
(configs/sdm.py:tiny) on the same training split, samples one image per held-out mask and seed with each sampler
(guidance 1.5, EMA params) and reports the U-Net's mean Dice (LV, MYO, LA) on the synthetic images against their
conditioning masks, with its Dice on the real test images as the reference.

Masks: the test split's masks, then augmented copies of them (affine + elastic, as `jaxboost synth` conditions
on) until there are `--masks`; seeds give each mask other starting noise. Every sampler of a seed starts from
the same x_T, so the Dice difference to DDIM-50 is paired per image. DDPM-1000 (2000 model calls per image with
guidance) runs on the first `--ddpm-masks` masks of the first `--ddpm-seeds` seeds when the full grid costs
too much CPU; its row says how many images it had.

  python -m benchmarks.sdm_fidelity [--quick] [--workdir DIR] [--sdm-steps N] [--masks N] [--seeds 0,1]
      [--ddpm-masks N] [--ddpm-seeds N] [--guidance S]
  (--quick: fewer steps everywhere, DDPM-100). fidelity.json in the workdir is rewritten after each sampler,
  so a run stopped by a timeout keeps the samplers it finished.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Row
from jaxboost import plots

SIZE = 64
# (sampler, steps): the few-step ones and the DDIM-50 reference first, DDPM last: a bounded run keeps them.
PLANS = [("dpmpp_2m", 10), ("dpmpp_2m", 15), ("dpmpp_2m", 20), ("ddim", 50), ("ddim", 25), ("ddpm", 1000)]
QUICK_PLANS = [("dpmpp_2m", 10), ("ddim", 50), ("ddim", 25), ("ddpm", 100)]
REFERENCE = "ddim50"


def dice_per_image(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[N] mean over structures (1, 2, 3) of Dice in percent (as the U-Net's own evaluation); a structure
    absent from both counts as 100."""
    scores = np.empty((len(pred), 3))
    for i, (p, g) in enumerate(zip(pred, target)):
        for j, label in enumerate((1, 2, 3)):
            a, b = p == label, g == label
            denom = a.sum() + b.sum()
            scores[i, j] = 1.0 if denom == 0 else 2.0 * (a & b).sum() / denom
    return 100.0 * scores.mean(axis=1)


def prepare(root: Path, quick: bool, sdm_steps: int | None):
    """The phantom corpus, the trained U-Net and SDM in `root` (each reused when already there)."""
    from jaxboost import config as config_lib
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import phantom
    from jaxboost.train import sdm as sdm_train
    from jaxboost.train import unet_seg

    real = root / "real"
    if not (real / "manifest.json").exists():
        src = phantom.write_phantom(root / "phantom", patients=12 if quick else 20, seed=0)
        items, info = corpus_lib.camus_items(src, size=SIZE, source="phantom")
        corpus_lib.build_corpus(items, real, size=SIZE, source="phantom", source_info=info)
    unet_cfg = config_lib.load_config("configs/unet_phantom.py:tiny", [f"data.corpus={real}"] +
                                      (["total_steps=60", "eval_every=30", "ckpt_every=30"] if quick else []))
    # The tiny config's 300 steps draw the sector and speckle but blur the walls; fidelity needs more.
    sdm_steps = sdm_steps or (60 if quick else 800)
    sdm_cfg = config_lib.load_config("configs/sdm.py:tiny", [f"data.corpus={real}", f"total_steps={sdm_steps}",
                                                            "eval_every=200", "ckpt_every=100"])
    if not (root / "unet" / "ckpt").exists():
        unet_seg.train(unet_cfg, str(root / "unet"))
    if not (root / "sdm" / "DONE").exists():
        sdm_train.train(sdm_cfg, str(root / "sdm"))  # resumes a killed run
    return real, unet_cfg, sdm_cfg


def held_out_masks(real: Path, count: int, seed: int = 0):
    """(masks [N, S, S], SDM label maps [N, S, S]): the test masks, then augmented copies (draw k of mask i
    from default_rng([seed, i, k])) until `count`."""
    from jaxboost.data import augment as augment_lib
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import labels as labels_lib

    test = [r for r in corpus_lib.open_corpus(real).iter("test") if r["structure"] == "LV"]  # one per image
    pairs = []
    for n in range(count):
        record, draw = test[n % len(test)], n // len(test)
        pairs.append((record["mask"], record["cone"]) if draw == 0 else augment_lib.augment_mask(
            record["mask"], np.random.default_rng([seed, n % len(test), draw]), cone=record["cone"]))
    masks = np.stack([m for m, _ in pairs])
    labels = np.stack([labels_lib.sdm_labels(m, c, is_cone=True) for m, c in pairs]).astype(np.int32)
    return masks, labels


def sample_and_score(name: str, steps: int, ctx: dict, n_masks: int, seeds: list[int]) -> dict:
    """Dice per image [len(seeds), n_masks] of one sampler, and its sampling seconds (compile excluded)."""
    from jaxboost.diffusion import samplers
    from jaxboost.train import sdm as sdm_train
    from jaxboost.train import unet_seg

    config = ctx["config"]
    run = samplers.make_sampler(sdm_train.apply_fn_for(sdm_train.build_model(config)),
                                sdm_train.make_schedule(config), channels=config.model.in_channels, sampler=name,
                                steps=steps, guidance=ctx["guidance"])
    # all seeds in one call (per-sample keys: the images do not depend on the batch they are sampled in)
    onehot = sdm_train.one_hot_labels(jnp.asarray(np.tile(ctx["labels"][:n_masks], (len(seeds), 1, 1))),
                                      config.model.num_labels)
    keys = jnp.concatenate([samplers.per_sample_keys(seed, 0, n_masks) for seed in seeds])
    compiled = run.lower(ctx["ema"], onehot, keys).compile()
    t0 = time.perf_counter()
    images = sdm_train.images_to_uint8(jax.block_until_ready(compiled(ctx["ema"], onehot, keys)))
    seconds = time.perf_counter() - t0
    pred = unet_seg.predict_labels(ctx["unet_cfg"], ctx["unet"], ctx["unet_params"], images, ctx["mesh"])
    dice = dice_per_image(pred, np.tile(ctx["masks"][:n_masks], (len(seeds), 1, 1))).reshape(len(seeds), n_masks)
    _save_grid(ctx["root"] / f"fidelity_{name}{steps}.png", f"{name}-{steps}", images, ctx["masks"][:n_masks],
               pred)
    return {"dice": dice, "seconds": seconds, "images": n_masks * len(seeds)}


def cached_sample_and_score(name: str, steps: int, ctx: dict, n_masks: int, seeds: list[int]) -> dict:
    """sample_and_score, kept in the workdir (scores_<sampler><steps>.npz) so a killed or extended run does not
    sample again what it has: reused only for the same SDM checkpoint, guidance, masks and seeds."""
    path = ctx["root"] / f"scores_{name}{steps}.npz"
    key = json.dumps({"sdm_step": ctx["sdm_step"], "guidance": ctx["guidance"], "masks": n_masks,
                      "seeds": list(seeds)})
    if path.exists():
        with np.load(path) as f:
            if str(f["key"]) == key:
                print(f"[fidelity] {name}-{steps}: scores reused from {path}", flush=True)
                return {"dice": f["dice"], "seconds": float(f["seconds"]), "images": int(f["images"])}
    result = sample_and_score(name, steps, ctx, n_masks, seeds)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, key=key, dice=result["dice"], seconds=result["seconds"], images=result["images"])
    os.replace(tmp, path)
    return result


def summarize(results: dict) -> dict:
    """Per sampler: mean Dice over all images, the per-seed means' min-max, and the paired difference to
    DDIM-50 (mean and its standard error over the images both sampled)."""
    out = {}
    ref = results.get(REFERENCE)
    for key, r in results.items():
        d = r["dice"]
        row = {"dice": float(d.mean()), "seed_means": [float(x) for x in d.mean(axis=1)],
               "images": r["images"], "seconds_per_image": r["seconds"] / r["images"]}
        if ref is not None and key != REFERENCE:
            s, m = d.shape
            diff = d - ref["dice"][:s, :m]
            row["vs_ddim50"] = float(diff.mean())
            row["vs_ddim50_se"] = float(diff.std(ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else float("nan")
        out[key] = row
    return out


def table(summary: dict, real_dice: float) -> str:
    lines = ["| sampler | model calls / image | U-Net Dice vs conditioning masks: mean [seed means] | "
             "vs DDIM-50, paired (± s.e.) | images | s / image |", "|---|---|---|---|---|---|",
             f"| (real test images) | | {real_dice:.1f} | | | |"]
    for key, r in summary.items():
        name, steps = key.rstrip("0123456789"), int(key[len(key.rstrip("0123456789")):])
        seeds = " / ".join(f"{x:.1f}" for x in r["seed_means"])
        vs = f"{r['vs_ddim50']:+.1f} ± {r['vs_ddim50_se']:.1f}" if "vs_ddim50" in r else ""
        lines.append(f"| {name}-{steps} | {2 * steps} | {r['dice']:.1f} [{seeds}] | {vs} | {r['images']} | "
                     f"{r['seconds_per_image']:.2f} |")
    return "\n".join(lines)


def run(quick: bool = False, workdir: str | None = None, sdm_steps: int | None = None, max_masks: int | None = None,
        guidance: float = 1.5, seeds=(0, 1), ddpm_masks: int | None = None, ddpm_seeds: int | None = None):
    from jaxboost import parallel
    from jaxboost.train import sdm as sdm_train
    from jaxboost.train import unet_seg

    root = Path(workdir or tempfile.mkdtemp(prefix="sdm_fidelity_"))
    real, unet_cfg, sdm_cfg = prepare(root, quick, sdm_steps)
    mesh = parallel.mesh_from_config(unet_cfg)
    unet, unet_params, _ = unet_seg.restore(unet_cfg, root / "unet")
    real_dice = unet_seg.make_evaluator(unet_cfg, unet, mesh)(unet_params, "test")["test/dice_mean"]
    config, ema, sdm_step = sdm_train.load_run(root / "sdm")
    n_masks = max_masks or (4 if quick else 32)
    masks, labels = held_out_masks(real, n_masks)
    ctx = dict(root=root, config=config, ema=ema, sdm_step=sdm_step, masks=masks, labels=labels,
               guidance=guidance, mesh=mesh, unet_cfg=unet_cfg, unet=unet, unet_params=unet_params)
    seeds, results = list(seeds), {}
    rows = [Row("sdm/fidelity real test images", "jax", float("nan"), float("nan"),
                note=f"U-Net Dice {real_dice:.1f} on real images")]
    extra = {"real_dice": real_dice, "sdm_steps": sdm_cfg.total_steps, "guidance": guidance, "masks": n_masks,
             "seeds": seeds, "workdir": str(root)}
    for name, steps in (QUICK_PLANS if quick else PLANS):
        m, s = (min(ddpm_masks or n_masks, n_masks), seeds[:ddpm_seeds or len(seeds)]) if name == "ddpm" \
            else (n_masks, seeds)
        results[f"{name}{steps}"] = cached_sample_and_score(name, steps, ctx, m, s)
        summary = summarize(results)
        r = summary[f"{name}{steps}"]
        rows.append(Row(f"sdm/fidelity {name}{steps}", "jax", r["seconds_per_image"], 1 / r["seconds_per_image"],
                        note=f"U-Net Dice {r['dice']:.1f} vs conditioning masks ({r['images']} images)"))
        print(f"[fidelity] {name}-{steps}: U-Net Dice {r['dice']:.1f} over {r['images']} images "
              f"(seed means {r['seed_means']}), {r['seconds_per_image']:.2f} s/image", flush=True)
        extra.update(table=table(summary, real_dice), results=summary)
        _write_json(root / "fidelity.json", extra)
    return rows, extra


def _write_json(path: Path, data: dict) -> None:
    path.with_suffix(".json.tmp").write_text(json.dumps(data, indent=1))
    os.replace(path.with_suffix(".json.tmp"), path)  # no half-written result


def _save_grid(path: Path, name: str, images: np.ndarray, masks: np.ndarray, pred: np.ndarray) -> None:
    """Rows of (synthetic image, conditioning mask, U-Net prediction), one column per image, for a look by eye."""
    n = min(len(images), 8)
    rows = [list(images[:n]), [plots.label_colours(m) for m in masks[:n]],
            [plots.label_colours(p) for p in pred[:n]]]
    titles = [[t] + [""] * (n - 1) for t in ("sample", "mask", "U-Net")]
    plots.image_grid(path, rows, titles, title=f"SDM fidelity: {name}", cell_inches=1.6)


def _seed_list(value: str) -> list[int]:
    try:
        return [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds: {value!r} is not a comma-separated list of integers") from None


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep (and reuse) the corpus and runs here")
    parser.add_argument("--sdm-steps", type=int, default=None, help="SDM training steps (default 800; quick 60)")
    parser.add_argument("--masks", type=int, default=None, help="held-out masks (default 32; quick 4)")
    parser.add_argument("--seeds", type=_seed_list, default=[0, 1], help="sampling seeds (default 0,1)")
    parser.add_argument("--ddpm-masks", type=int, default=None, help="DDPM-1000 on the first N masks only")
    parser.add_argument("--ddpm-seeds", type=int, default=None, help="DDPM-1000 with the first N seeds only")
    parser.add_argument("--guidance", type=float, default=1.5)
    args = parser.parse_args()
    rows, extra = run(args.quick, args.workdir, args.sdm_steps, args.masks, args.guidance, args.seeds,
                      args.ddpm_masks, args.ddpm_seeds)
    for row in rows:
        print(f"{row.case:<32} {row.seconds:8.2f}s  {row.note}")
    print(extra["table"])
