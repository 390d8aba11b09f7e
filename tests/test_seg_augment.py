"""On-device segmentation augmentation (seg_augment): identity when off, image and mask move together,
one result per key, dtypes and shapes kept, bad magnitudes refused naming the field."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxboost.data import pipeline, seg_augment

S = 32
ALL = dict(rotate_deg=8.0, scale=0.1, translate=0.05, gamma=0.3, contrast=0.2, brightness=0.1, noise=0.1)


def _pair(b=3):
    rng = np.random.default_rng(0)
    image = rng.random((b, S, S)).astype(np.float32)
    mask = np.zeros((b, S, S), np.float32)
    mask[:, 8:20, 10:18] = 1.0
    return jnp.asarray(image), jnp.asarray(mask)


def test_zero_magnitudes_are_the_identity():
    image, mask = _pair()
    off = dict(seg_augment.OFF)
    got = seg_augment.random_affine(jax.random.key(0), image, mask, off)   # the warp itself, at zero
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(image), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(mask))
    same = seg_augment.augment_batch(jax.random.key(0), image, mask, {})
    assert same[0] is image and same[1] is mask


def _centroid(m):
    rows, cols = np.nonzero(np.asarray(m) > 0.5)
    return np.array([rows.mean(), cols.mean()])


def test_a_masks_centroid_follows_the_shift_applied_to_its_image():
    """A bright square in the image and its mask: after the affine both are where the warp put the square."""
    image = np.zeros((4, S, S), np.float32)
    image[:, 6:14, 8:16] = 1.0
    mask = image.copy()
    m = dict(seg_augment.OFF, translate=0.2, rotate_deg=10.0, scale=0.1)
    warped_image, warped_mask = seg_augment.random_affine(jax.random.key(3), jnp.asarray(image),
                                                          jnp.asarray(mask), m)
    moved = 0.0
    for i in range(4):
        c_image, c_mask = _centroid(warped_image[i]), _centroid(warped_mask[i])
        np.testing.assert_allclose(c_mask, c_image, atol=0.75)
        moved = max(moved, float(np.abs(c_mask - _centroid(mask[i])).max()))
    assert moved > 1.0   # the draw did move the square
    # and the mask's centroid is the affine of the original centroid: the same inverse map, solved back
    coords = np.asarray(seg_augment._sample_coordinates(jax.random.split(jax.random.key(3), 4)[0], S, m))
    src = coords[:, int(round(_centroid(warped_mask[0])[0])), int(round(_centroid(warped_mask[0])[1]))]
    np.testing.assert_allclose(src, _centroid(mask[0]), atol=1.0)


def test_same_key_same_result_other_key_other_result():
    image, mask = _pair()
    a = seg_augment.augment_batch(jax.random.key(1), image, mask, ALL)
    b = seg_augment.augment_batch(jax.random.key(1), image, mask, ALL)
    c = seg_augment.augment_batch(jax.random.key(2), image, mask, ALL)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_device_preprocess_keeps_dtypes_shapes_and_binary_masks():
    config = ml_collections.ConfigDict({"trainer": "vl_seg", "data": {"size": S, "augment": ALL}})
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (2, 16, 16), dtype=np.uint8)),
             "mask": jnp.asarray(rng.integers(0, 4, (2, 16, 16), dtype=np.uint8)),
             "label": jnp.asarray(np.array([1, 2], np.int32))}
    out = jax.jit(lambda b, k: pipeline.device_preprocess(b, config, k))(batch, jax.random.key(0))
    plain = pipeline.device_preprocess(batch, config)   # no rng (evaluation): no augmentation
    assert out["image"].shape == plain["image"].shape == (2, S, S, 3) and out["image"].dtype == jnp.float32
    assert out["mask"].shape == plain["mask"].shape == (2, S, S) and out["mask"].dtype == jnp.float32
    assert set(np.unique(np.asarray(out["mask"]))) <= {0.0, 1.0}
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert not np.array_equal(np.asarray(out["image"]), np.asarray(plain["image"]))


@pytest.mark.parametrize("augment, field", [({"rotation": 5.0}, "rotation"), ({"scale": -0.1}, "scale"),
                                            ({"noise": "lots"}, "noise"), ({"translate": 0.9}, "translate")])
def test_a_bad_field_is_one_value_error_naming_it(augment, field):
    with pytest.raises(ValueError, match=rf"^config\.data\.augment\.{field}[=:]") as err:
        seg_augment.magnitudes(augment)
    assert "\n" not in str(err.value)


class _ImageAsLogits:
    """A stand-in segmenter whose logits are its (normalised) image: the loss then reads both the augmented
    image and the augmented mask."""

    def apply(self, variables, image, input_ids, attention_mask, **kwargs):
        return 4.0 * image[..., 0]   # params unused: the weights stay as they are, step after step


def test_time_to_dice_torch_inputs_are_the_train_steps_own(tmp_path):
    """benchmarks/time_to_dice.py feeds torch the arrays jaxboost's train step makes, augmentation included:
    the step's loss (task.make_train_step + vl_seg.make_loss_fn) equals the loss of the baseline's inputs."""
    from benchmarks import time_to_dice
    from jaxboost.config import load_config
    from jaxboost.data import corpus, phantom
    from jaxboost.train import optim, state as state_lib, task, vl_seg
    root = phantom.write_phantom(tmp_path / "phantom", patients=4, seed=1, size=(40, 32))
    items, info = corpus.camus_items(root, size=24, source="phantom")
    corpus.build_corpus(items, tmp_path / "c", size=24, source="phantom", source_info=info)
    config = load_config("configs/clipseg.py:demo")
    config.update_from_flattened_dict({"data.size": 24, "seed": 5})
    loader = lambda: pipeline.make_loader(tmp_path / "c", "train", global_batch_size=4, seed=5,  # noqa: E731
                                          transform=pipeline.segmentation_transform(3, 24, host_uint8=True),
                                          process_index=0, process_count=1)
    tx = optim.make_optimizer(config, 10, 5)
    state = state_lib.initial_state({"w": jnp.zeros(())}, tx, int(config.seed) + 1)
    step = jax.jit(task.make_train_step(vl_seg.make_loss_fn(config, _ImageAsLogits()), tx))
    ids = {"input_ids": jnp.zeros((4, 8), jnp.int32), "attention_mask": jnp.ones((4, 8), jnp.int32)}
    for k, (raw, made) in enumerate(zip(loader(), time_to_dice._model_inputs(loader(), config))):
        if k == 3:
            break
        state, metrics = step(state, {**{f: jnp.asarray(raw[f]) for f in ("image", "mask", "label")}, **ids})
        logits = _ImageAsLogits().apply({}, vl_seg.normalise(config, jnp.asarray(made["image"])), None, None)
        want, _ = vl_seg.dice_bce(logits, jnp.asarray(made["mask"]), config.loss.dice_weight, config.loss.bce_weight,
                                  config.loss.mode)
        np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
