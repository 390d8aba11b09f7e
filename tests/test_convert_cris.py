"""The CRIS checkpoints users hold all load (CRIS.pytorch training checkpoints, medvlsm's protocol-5 file, Lightning
checkpoints of medvlsm's module), the default output is medvlsm's bicubic upsampling, and CRIS.pytorch's H/4
training map is an option that trains."""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.torch_ref import cris as ref
from jaxboost.convert.cris import cris_from_checkpoint
from jaxboost.losses.segmentation import dice_bce

CLIP_KW = dict(embed_dim=64, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16, context_length=12,
               vocab_size=50, transformer_width=32, transformer_heads=2, transformer_layers=1)
CRIS_KW = dict(fpn_in=(128, 256, 64), fpn_out=(16, 32, 64), num_layers=1, vis_dim=32, num_head=4, dim_ffn=48,
               word_dim=64)
FIELDS = dict(num_heads=4, text_heads=2, dropout_rate=0.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def torch_cris():
    torch.manual_seed(0)
    model = ref.CRIS(CLIP_KW, dropout=0.0, **CRIS_KW)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(size=64, length=6):
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 3, size, size)).astype(np.float32)
    ids = rng.integers(1, 48, size=(2, length))
    ids[:, -1] = 49
    return pixels, ids, np.ones((2, length), np.int64)


def _write_formats(model, tmp_path) -> dict:
    sd = model.state_dict()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(*(torch.tensor(a) for a in _inputs()[:2])).sum().backward()
    optimizer.step()  # a real optimizer state (exp_avg tensors) in the checkpoint
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[35], gamma=0.1)
    paths = {name: tmp_path / name for name in ("cris_best.pth", "cris.pt", "epoch=9.ckpt")}
    # CRIS.pytorch's train.py: DDP keys, optimizer, scheduler (milestones is a Counter), metrics
    torch.save({"epoch": 9, "cur_iou": 0.61, "best_iou": 0.62, "prec": {"Pr@50": 0.7},
                "state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, paths["cris_best.pth"])
    # medvlsm's scripts/convert_cris_model.py: the unwrapped state dict, pickle protocol 5
    torch.save({k: v for k, v in sd.items()}, paths["cris.pt"], pickle_protocol=5)
    # Lightning checkpoint of medvlsm's module: "net." keys, hyper_parameters holding objects
    torch.save({"epoch": 9, "global_step": 90, "pytorch-lightning_version": "2.0.2",
                "state_dict": {"net." + k: v for k, v in sd.items()},
                "hyper_parameters": {"net": model, "optimizer": functools.partial(torch.optim.AdamW, lr=2e-5),
                                     "scheduler": functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau)},
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [scheduler.state_dict()]},
               paths["epoch=9.ckpt"])
    return paths


def test_every_cris_checkpoint_format_loads_to_the_same_model(torch_cris, tmp_path):
    paths = _write_formats(torch_cris, tmp_path)
    pixels, ids, mask = _inputs()
    with torch.no_grad():
        quarter = torch_cris(torch.tensor(pixels), torch.tensor(ids), torch.tensor(mask))
        # medvlsm upsamples CRIS's H/4 logits to the input size: bicubic, align_corners=True
        expected = F.interpolate(quarter, size=pixels.shape[2:], mode="bicubic", align_corners=True)[:, 0].numpy()
    loaded = {name: cris_from_checkpoint(str(path), **FIELDS) for name, path in paths.items()}
    module, reference = loaded["cris.pt"]
    assert module.upsample == "bicubic_align"
    out = np.asarray(jax.jit(module.apply)(reference, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids),
                                           jnp.asarray(mask)))
    np.testing.assert_allclose(out, expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    for name, (other_module, variables) in loaded.items():
        assert other_module == module, name
        jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_quarter_size_logits_train_against_the_nearest_downsampled_mask():
    rng = np.random.default_rng(1)
    masks = (rng.random((2, 64, 64)) > 0.6).astype(np.float32)
    logits = rng.normal(size=(2, 16, 16)).astype(np.float32)
    # CRIS.pytorch: F.interpolate(mask, logits size, mode="nearest")
    small = F.interpolate(torch.tensor(masks)[:, None], size=(16, 16), mode="nearest")[:, 0].numpy()
    got, _ = dice_bce(jnp.asarray(logits), jnp.asarray(masks))
    want, _ = dice_bce(jnp.asarray(logits), jnp.asarray(small))
    assert float(got) == pytest.approx(float(want), abs=1e-7)
    assert float(got) != pytest.approx(float(dice_bce(jnp.asarray(logits), jnp.asarray(masks[:, :16, :16]))[0]))
    with pytest.raises(ValueError, match="must both be"):
        dice_bce(jnp.zeros((2, 80, 80)), jnp.asarray(masks))


@pytest.mark.slow
def test_cris_with_quarter_size_output_trains(torch_cris, tmp_path):
    torch.save(torch_cris.state_dict(), tmp_path / "cris.pt")
    module, variables = cris_from_checkpoint(str(tmp_path / "cris.pt"), **FIELDS, upsample="none")
    pixels, ids, mask = _inputs()
    args = (jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), jnp.asarray(mask))
    masks = jnp.asarray(np.random.default_rng(2).random((2, 64, 64)) > 0.5, jnp.float32)

    def loss(params):
        logits, _ = module.apply({**variables, "params": params}, *args, train=True, mutable=["batch_stats"])
        assert logits.shape == (2, 16, 16)
        return dice_bce(logits, masks)[0]

    step = jax.jit(jax.value_and_grad(loss))
    params, losses = variables["params"], []
    for _ in range(3):
        value, grads = step(params)
        losses.append(float(value))
        params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
