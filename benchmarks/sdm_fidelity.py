"""SDM label fidelity (issue 3): do the samples show the structures of the masks that conditioned them?

Trains the foundation U-Net segmenter (configs/unet_phantom.py:tiny) on phantom images and a tiny SDM
(configs/sdm.py:tiny) on the same training split, samples one image for every held-out (test) mask with
DDPM-1000, DDIM-50 and DDIM-25 (guidance 1.5, EMA params), and reports the U-Net's mean Dice (LV, MYO, LA)
on the synthetic images against their conditioning masks, with its Dice on the real test images as the
reference.

  python -m benchmarks.sdm_fidelity [--quick] [--workdir DIR] [--sdm-steps N] [--masks N]
  (--quick: fewer steps everywhere, DDPM-100; --masks caps the held-out masks, picked evenly across
  views and phases, because DDPM-1000 with guidance costs 2000 model calls per image on a CPU)
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


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over images and structures (1, 2, 3) of Dice in percent (as the U-Net's own evaluation); an
    absent structure in both counts as 100."""
    scores = []
    for p, g in zip(pred, target):
        for label in (1, 2, 3):
            a, b = p == label, g == label
            denom = a.sum() + b.sum()
            scores.append(1.0 if denom == 0 else 2.0 * (a & b).sum() / denom)
    return 100.0 * float(np.mean(scores))


def run(quick: bool = False, workdir: str | None = None, sdm_steps: int | None = None, max_masks: int | None = None,
        guidance: float = 1.5):
    from jaxboost import config as config_lib
    from jaxboost import parallel
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import labels as labels_lib
    from jaxboost.data import phantom
    from jaxboost.diffusion import samplers
    from jaxboost.train import sdm as sdm_train
    from jaxboost.train import unet_seg

    root = Path(workdir or tempfile.mkdtemp(prefix="sdm_fidelity_"))
    size = 64
    real = root / "real"
    if not (real / "manifest.json").exists():
        src = phantom.write_phantom(root / "phantom", patients=12 if quick else 20, seed=0)
        items, info = corpus_lib.camus_items(src, size=size, source="phantom")
        corpus_lib.build_corpus(items, real, size=size, source="phantom", source_info=info)

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

    mesh = parallel.mesh_from_config(unet_cfg)
    unet, unet_params, _ = unet_seg.restore(unet_cfg, root / "unet")
    real_dice = unet_seg.evaluate_params(unet_cfg, unet, unet_params, "test", mesh)["test/dice_mean"]

    config, ema, _ = sdm_train.load_run(root / "sdm")
    test = [r for r in corpus_lib.open_corpus(real).iter("test") if r["structure"] == "LV"]
    max_masks = max_masks or (4 if quick else len(test))
    if len(test) > max_masks:  # evenly spaced over the sorted records, so views and phases stay mixed
        test = [test[i] for i in np.linspace(0, len(test) - 1, max_masks).round().astype(int)]
    masks = np.stack([r["mask"] for r in test])
    labels = np.stack([labels_lib.sdm_labels(r["mask"], r["cone"], is_cone=True) for r in test]).astype(np.int32)
    onehot = sdm_train.one_hot_labels(jnp.asarray(labels), config.model.num_labels)
    keys = samplers.per_sample_keys(0, 0, len(test))
    model, schedule = sdm_train.build_model(config), sdm_train.make_schedule(config)
    results = {}
    rows = [Row("sdm/fidelity real test images", "jax", float("nan"), float("nan"),
                note=f"U-Net Dice {real_dice:.1f} on real images")]
    plans = [("ddim", 25), ("ddim", 50), ("ddpm", 100 if quick else 1000)]  # cheap first
    for name, steps in plans:
        run_sampler = samplers.make_sampler(sdm_train.apply_fn_for(model), schedule, channels=config.model.in_channels,
                                            sampler=name, steps=steps, guidance=guidance)
        jax.block_until_ready(run_sampler(ema, onehot[:1], keys[:1]))  # compile
        t0 = time.perf_counter()
        images = sdm_train.images_to_uint8(jax.block_until_ready(run_sampler(ema, onehot, keys)))
        seconds = time.perf_counter() - t0
        pred = unet_seg.predict_labels(unet_cfg, unet, unet_params, images, mesh)
        dice = _dice(pred, masks)
        rows.append(Row(f"sdm/fidelity {name}{steps}", "jax", seconds, len(test) / seconds,
                        note=f"U-Net Dice {dice:.1f} vs conditioning masks ({len(test)} held-out masks)"))
        results[f"{name}{steps}"] = {"dice": dice, "seconds": seconds, "images": len(test)}
        print(f"[fidelity] {name}-{steps}: U-Net Dice {dice:.1f} on {len(test)} samples ({seconds:.0f} s)", flush=True)
        _save_grid(root / f"fidelity_{name}{steps}.png", images, masks, pred)
    table = "\n".join(["| sampler | U-Net Dice vs conditioning masks | s per batch |", "|---|---|---|",
                        f"| real test images | {real_dice:.1f} | |"] +
                       [f"| {k} | {v['dice']:.1f} | {v['seconds']:.1f} |" for k, v in results.items()])
    return rows, {"table": table, "results": results, "real_dice": real_dice, "sdm_steps": sdm_cfg.total_steps,
                  "guidance": guidance, "masks": len(test), "workdir": str(root)}


def _save_grid(path: Path, images: np.ndarray, masks: np.ndarray, pred: np.ndarray) -> None:
    """Rows of (synthetic image, conditioning mask, U-Net prediction) for a look by eye."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = min(len(images), 8)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
    for i in range(n):
        for row, (img, cmap, title) in enumerate([(images[i], "gray", "sample"),
                                                  (masks[i], "viridis", "mask"), (pred[i], "viridis", "U-Net")]):
            axes[row, i].imshow(img, cmap=cmap, vmin=0, vmax=255 if row == 0 else 3)
            axes[row, i].set_axis_off()
            if i == 0:
                axes[row, i].set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep (and reuse) the corpus and runs here")
    parser.add_argument("--sdm-steps", type=int, default=None, help="SDM training steps (default 800; quick 60)")
    parser.add_argument("--masks", type=int, default=None, help="at most this many held-out masks")
    parser.add_argument("--guidance", type=float, default=1.5)
    args = parser.parse_args()
    rows, extra = run(args.quick, args.workdir, args.sdm_steps, args.masks, args.guidance)
    for row in rows:
        print(f"{row.case:<32} {row.seconds:8.2f}s  {row.note}")
    print(extra["table"])
    out = Path(extra["workdir"], "fidelity.json")
    out.with_suffix(".json.tmp").write_text(json.dumps(extra, indent=1))
    os.replace(out.with_suffix(".json.tmp"), out)  # no half-written result
