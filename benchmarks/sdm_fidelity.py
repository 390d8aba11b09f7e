"""SDM label fidelity (issue 3): do the samples show the structures of the masks that conditioned them?

Trains the foundation U-Net segmenter (configs/unet_phantom.py:tiny) on phantom images and a tiny SDM
(configs/sdm.py:tiny) on the same training split, samples one image for every held-out (test) mask with
DDPM-1000, DDIM-50 and DDIM-25 (guidance 1.5, EMA params), and reports the U-Net's mean Dice (LV, MYO, LA)
on the synthetic images against their conditioning masks, with its Dice on the real test images as the
reference.

  python -m benchmarks.sdm_fidelity [--quick]      (--quick: fewer steps everywhere, DDPM-100)
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Row


def _dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean over images and structures (1, 2, 3) of Dice; an absent structure in both counts as 1."""
    scores = []
    for p, g in zip(pred, target):
        for label in (1, 2, 3):
            a, b = p == label, g == label
            denom = a.sum() + b.sum()
            scores.append(1.0 if denom == 0 else 2.0 * (a & b).sum() / denom)
    return float(np.mean(scores))


def run(quick: bool = False, workdir: str | None = None):
    from jaxboost import config as config_lib
    from jaxboost import parallel
    from jaxboost.data import corpus as corpus_lib
    from jaxboost.data import labels as labels_lib
    from jaxboost.data import phantom
    from jaxboost.diffusion import samplers
    from jaxboost.train import loop
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
    sdm_cfg = config_lib.load_config("configs/sdm.py:tiny", [f"data.corpus={real}", "eval_every=0"] +
                                     (["total_steps=60"] if quick else []))
    if not (root / "unet" / "ckpt").exists():
        unet_seg.train(unet_cfg, str(root / "unet"))
    if not (root / "sdm" / "ckpt").exists():
        sdm_train.train(sdm_cfg, str(root / "sdm"))

    mesh = parallel.mesh_from_config(unet_cfg)
    unet = unet_seg.build_model(unet_cfg)
    shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))["params"])
    tx = loop.make_optimizer(unet_cfg, unet_cfg.total_steps)
    abstract = jax.eval_shape(lambda: loop.TrainState(step=jnp.zeros((), jnp.int32), params=shapes,
                                                        opt_state=tx.init(shapes), rng=jax.random.PRNGKey(0)))
    unet_params = loop.load_params(root / "unet", abstract, prefer="best")[0].params
    real_dice = unet_seg.evaluate_params(unet_cfg, unet, unet_params, "test", mesh)["test/dice_mean"]

    config, ema, _ = sdm_train.load_run(root / "sdm")
    test = [r for r in corpus_lib.open_corpus(real).iter("test") if r["structure"] == "LV"]
    masks = np.stack([r["mask"] for r in test])
    labels = np.stack([labels_lib.sdm_labels(r["mask"], r["cone"], is_cone=True) for r in test]).astype(np.int32)
    onehot = sdm_train.one_hot_labels(jnp.asarray(labels), config.model.num_labels)
    keys = samplers.per_sample_keys(0, 0, len(test))
    model, schedule = sdm_train.build_model(config), sdm_train.make_schedule(config)
    rows = [Row("sdm/fidelity real test images", "jax", float("nan"), float("nan"),
                note=f"U-Net Dice {real_dice:.3f} on real images")]
    plans = [("ddpm", 100 if quick else 1000), ("ddim", 50), ("ddim", 25)]
    for name, steps in plans:
        run_sampler = samplers.make_sampler(sdm_train.apply_fn_for(model), schedule, channels=config.model.in_channels,
                                            sampler=name, steps=steps, guidance=1.5)
        jax.block_until_ready(run_sampler(ema, onehot[:1], keys[:1]))  # compile
        t0 = time.perf_counter()
        images = sdm_train.images_to_uint8(jax.block_until_ready(run_sampler(ema, onehot, keys)))
        seconds = time.perf_counter() - t0
        pred = unet_seg.predict_labels(unet_cfg, unet, unet_params, images, mesh)
        dice = _dice(pred, masks)
        rows.append(Row(f"sdm/fidelity {name}{steps}", "jax", seconds, len(test) / seconds,
                        note=f"U-Net Dice {dice:.3f} vs conditioning masks ({len(test)} held-out masks)"))
    return rows


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None, help="keep (and reuse) the corpus and runs here")
    args = parser.parse_args()
    for row in run(args.quick, args.workdir):
        print(f"{row.case:<32} {row.seconds:8.2f}s  {row.note}")
