"""Shared by the SDM trainer and synth tests: a small phantom corpus and a tiny SDM config for it."""
from __future__ import annotations

from pathlib import Path

from jaxboost.config import load_config
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import phantom

SIZE = 16


def phantom_corpus(root: Path, patients: int = 6, size: int = SIZE) -> Path:
    """A phantom written at 40x32 and built into a `size` px corpus (train/val/test splits)."""
    source = phantom.write_phantom(root / "phantom", patients=patients, seed=0, size=(40, 32))
    items, info = corpus_lib.camus_items(source, size=size, source="phantom")
    corpus_lib.build_corpus(items, root / "corpus", size=size, source="phantom", source_info=info)
    return root / "corpus"


def tiny_config(corpus: Path, **overrides):
    """configs/sdm.py:tiny shrunk to SIZE px: one level (no down- or up-sampling, so no attention), narrow
    SPADE. The trainer, synth and task tests need a U-Net, not the whole architecture (test_sdm_model's parity
    tests cover that); one level halves the compile of a run's programs (41 -> 21 s for one step's fit)."""
    base = {"data.corpus": str(corpus), "data.size": SIZE, "model.image_size": SIZE,
            "model.channel_mult": (1,), "model.attention_resolutions": (), "model.spade_hidden": 16,
            "total_steps": 0, "log_every": 1, "eval_every": 0, "ckpt_every": 0, "async_checkpointing": False,
            "sampler.steps": 2, "mesh.data": -1}
    base.update(overrides)
    config = load_config("configs/sdm.py:tiny")
    config.update_from_flattened_dict(base)
    return config


def random_reference(fields: dict, seed: int = 0):
    """The torch reference SDM U-Net with every tensor perturbed (norm scales != 1, biases != 0, no zero-init)."""
    import torch
    from ml_collections import ConfigDict

    from benchmarks.torch_ref.sdm_unet import unet_from_config
    torch.manual_seed(seed)
    ref = unet_from_config(ConfigDict(fields)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref
