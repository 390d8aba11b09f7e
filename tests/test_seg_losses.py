"""Segmentation losses and metrics against torch formulas and closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxboost import metrics
from jaxboost.losses import segmentation as seg
from jaxboost.models.resize import torch_bilinear_matrix

torch = pytest.importorskip("torch")


def _batch(rng, b=3, h=16, w=20):
    logits = rng.normal(scale=3.0, size=(b, h, w)).astype(np.float32)
    masks = (rng.random((b, h, w)) < 0.3).astype(np.float32)
    return logits, masks


def test_sigmoid_dice_matches_monai_formula_in_torch(rng):
    logits, masks = _batch(rng)
    p, g = torch.sigmoid(torch.tensor(logits)), torch.tensor(masks)
    # MONAI DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5), reduced over (H, W) per sample.
    ref = 1 - (2 * (p * g).sum((1, 2)) + 1e-5) / (p.sum((1, 2)) + g.sum((1, 2)) + 1e-5)
    np.testing.assert_allclose(seg.sigmoid_dice_loss(jnp.asarray(logits), jnp.asarray(masks)), ref.numpy(),
                               rtol=1e-5, atol=1e-6)


def test_bce_matches_torch_bce_with_logits(rng):
    logits, masks = _batch(rng)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor(logits), torch.tensor(masks))
    got = seg.bce_with_logits(jnp.asarray(logits), jnp.asarray(masks)).mean()
    np.testing.assert_allclose(got, ref.item(), rtol=1e-5)


def test_dice_bce_is_weighted_sum_and_bce_gradient_is_nonzero(rng):
    logits, masks = _batch(rng)
    loss, terms = seg.dice_bce(jnp.asarray(logits), jnp.asarray(masks), dice_weight=1.0, bce_weight=0.25)
    np.testing.assert_allclose(loss, terms["dice"] + 0.25 * terms["ce"], rtol=1e-6)
    g_ce = jax.grad(lambda x: seg.dice_bce(x, jnp.asarray(masks), 0.0, 1.0)[0])(jnp.asarray(logits))
    # d BCE / d logit = (sigmoid(x) - y) / N, the closed form.
    expected = (jax.nn.sigmoid(logits) - masks) / masks[0].size / masks.shape[0]
    np.testing.assert_allclose(g_ce, expected, rtol=1e-4, atol=1e-9)
    assert float(jnp.abs(g_ce).sum()) > 0


def test_original_mode_reproduces_zero_cross_entropy(rng):
    logits, masks = _batch(rng)
    # The public code's term: torch CrossEntropyLoss over a single channel is exactly zero.
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits)[:, None], torch.tensor(masks)[:, None])
    assert ref.item() == 0.0
    loss, terms = seg.dice_bce(jnp.asarray(logits), jnp.asarray(masks), 1.0, 0.25, ce_mode="original")
    assert float(terms["ce"]) == 0.0
    g = jax.grad(lambda x: seg.dice_bce(x, jnp.asarray(masks), 0.0, 1.0, ce_mode="original")[0])(
        jnp.asarray(logits))
    assert float(jnp.abs(g).max()) == 0.0
    np.testing.assert_allclose(loss, terms["dice"], rtol=1e-6)


def test_loss_rejects_shape_mismatch_and_unknown_mode():
    with pytest.raises(ValueError, match="must both be"):  # logits larger than the masks
        seg.dice_bce(jnp.zeros((1, 8, 8)), jnp.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="ce_mode"):
        seg.dice_bce(jnp.zeros((1, 4, 4)), jnp.zeros((1, 4, 4)), ce_mode="focal")


def test_dice_iou_and_hausdorff_closed_forms():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True          # 100 px
    pred = np.zeros_like(gt)
    pred[5:15, 10:20] = True       # 100 px, overlap 50
    dice, iou = metrics.dice_iou(pred, gt)
    assert dice == pytest.approx(50.0) and iou == pytest.approx(100 * 50 / 150)
    # Boundaries: gt columns 5..14, pred 10..19; farthest boundary points are 5 columns apart.
    assert metrics.hausdorff(pred, gt) == pytest.approx(5.0)
    assert metrics.hausdorff(pred, gt, spacing=(1.0, 0.5)) == pytest.approx(2.5)
    assert metrics.dice_iou(np.zeros_like(gt), np.zeros_like(gt)) == (100.0, 100.0)
    assert np.isnan(metrics.hausdorff(np.zeros_like(gt), gt))


def test_score_mask_resizes_to_source_resolution_like_torch(rng):
    logits = rng.normal(size=(13, 13)).astype(np.float32)
    gt = (rng.random((52, 40)) < 0.5).astype(np.uint8)
    probs = torch.nn.functional.interpolate(torch.sigmoid(torch.tensor(logits))[None, None].double(), (52, 40),
                                            mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(metrics.probabilities_at(logits, (52, 40)), probs, atol=1e-6)
    out = metrics.score_mask(logits, gt, threshold=0.35)
    assert out["dice"] == pytest.approx(metrics.dice_iou(probs > 0.35, gt)[0])


def test_score_mask_rejects_non_binary_mask():
    with pytest.raises(ValueError, match="LV mask must be binary"):
        metrics.score_mask(np.zeros((4, 4)), np.array([[0, 1], [2, 3]]), name="LV mask")


def test_resize_matrices_are_built_once_and_read_only(rng):
    logits = rng.normal(size=(13, 10)).astype(np.float32)
    first = metrics.probabilities_at(logits, (52, 40))
    np.testing.assert_array_equal(metrics.probabilities_at(logits, (52, 40)), first)
    m = metrics._bilinear_matrix(13, 52)
    assert m is metrics._bilinear_matrix(13, 52) and not m.flags.writeable
    np.testing.assert_array_equal(m, torch_bilinear_matrix(13, 52).astype(np.float64))
