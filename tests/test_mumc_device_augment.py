"""MUMC's crop and flip on device (data.augment_at="device"): the same boxes and flips as the host path (same
per-record draws), and the crop-resize equal to PIL's bicubic resize of that box to a uint8 level."""
import jax
import numpy as np
import pytest
from PIL import Image

from jaxboost.config import load_config
from jaxboost.data import caption_augment, pipeline
from jaxboost.train import mumc_pretrain

SIZE = 32


def _pil_view(image, box, size):
    top, left, h, w = box
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC,
                                                    box=(left, top, left + w, top + h)))


@pytest.mark.parametrize("box", [(0, 0, 48, 48), (5, 7, 20, 30), (10.5, 3.25, 37.5, 41.0), (0, 0, 12, 9)])
def test_crop_resize_equals_pil_for_the_same_box(box):
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(image).resize((48, 48)))  # some spatial smoothness, as a photo
    got = jax.jit(pipeline.crop_resize_flip, static_argnums=3)(
        image[None], np.asarray([box], np.float32), np.zeros((1,), np.uint8), SIZE)
    want = _pil_view(image, box, SIZE).astype(np.float32)
    diff = np.abs(np.asarray(got[0]) - want)
    assert diff.max() <= 2 and diff.mean() < 0.3, (diff.max(), diff.mean())   # PIL rounds its fixed-point taps


def test_device_inputs_draw_the_host_paths_box_and_flip():
    """Same rng -> the same box and flip as pretrain_augment (its draw order), and the two views equal."""
    image = np.asarray(Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE), np.uint8))
                       .resize((SIZE, SIZE)))
    flips, kwargs = [], dict(crop_scale=(0.2, 1.0), flip=True, randaugment=None)
    boxes, views = [], []
    for seed in range(40):
        host = caption_augment.pretrain_augment(image, np.random.default_rng(seed), SIZE, **kwargs)
        inputs = caption_augment.device_view_inputs(image, np.random.default_rng(seed), SIZE, **kwargs)
        box = caption_augment.random_resized_crop_box(np.random.default_rng(seed), SIZE, SIZE, (0.2, 1.0))
        np.testing.assert_allclose(inputs["crop_box"], box)
        flips.append(int(inputs["flip"]))
        boxes.append(inputs["crop_box"]), views.append((inputs["images"], host))
    got = np.asarray(pipeline.crop_resize_flip(np.stack([v[0] for v in views]), np.stack(boxes),
                                               np.asarray(flips, np.uint8), SIZE))
    want = np.stack([v[1] for v in views]).astype(np.float32)
    assert np.abs(got - want).max() <= 2 and np.abs(got - want).mean() < 0.3
    assert 10 <= sum(flips) <= 30     # flipped with probability 1/2


def test_device_flip_rate_is_one_half_and_mirrors():
    image = np.random.default_rng(2).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    full = np.asarray([[0, 0, SIZE, SIZE]], np.float32)
    plain = np.asarray(pipeline.crop_resize_flip(image, full, np.zeros((1,), np.uint8), SIZE))
    mirrored = np.asarray(pipeline.crop_resize_flip(image, full, np.ones((1,), np.uint8), SIZE))
    np.testing.assert_array_equal(plain[0], image[0])          # the whole image at its own size: itself
    np.testing.assert_array_equal(mirrored[0], image[0, :, ::-1])
    draws = [int(caption_augment.device_view_inputs(image[0], np.random.default_rng(s), SIZE, randaugment=None)["flip"])
             for s in range(2000)]
    assert abs(np.mean(draws) - 0.5) < 0.04


def test_step_preprocess_applies_box_and_normalises():
    config = load_config("configs/mumc_pretrain.py:tiny", [f"data.size={SIZE}", "data.augment_at=device"])
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    rng = np.random.default_rng(4)
    view = mumc_pretrain.augmented_view(image, rng, config)
    assert set(view) == {"images", "crop_box", "flip"} and view["images"].dtype == np.uint8
    batch = {k: np.asarray(v)[None] for k, v in view.items()}
    out = pipeline.device_preprocess(batch, config)
    assert set(out) == {"images"} and out["images"].shape == (1, SIZE, SIZE, 3)
    host = caption_augment.pretrain_augment(image, np.random.default_rng(4), SIZE, crop_scale=(0.5, 1.0),
                                            flip=True, randaugment=None)
    np.testing.assert_allclose(out["images"][0], caption_augment.normalize(host), atol=2.5 / 255 / 0.26)


def test_augment_at_is_checked():
    config = load_config("configs/mumc_pretrain.py:tiny", ["data.augment_at=gpu"])
    with pytest.raises(ValueError, match="config.data.augment_at='gpu'"):
        mumc_pretrain.augmented_view(np.zeros((8, 8), np.uint8), np.random.default_rng(0), config)
    config = load_config("configs/mumc_pretrain.py:tiny", ["data.augment_at=device", "data.host_uint8=False"])
    with pytest.raises(ValueError, match="host_uint8=True"):
        mumc_pretrain.augmented_view(np.zeros((8, 8), np.uint8), np.random.default_rng(0), config)


def test_vqa_loader_with_device_augment_repeats_and_matches_the_host_views(tmp_path):
    """The VQA training loader under augment_at="device": each batch carries boxes and flips, repeats with the
    seed (the draws are grain's per-record rng, as the host path's, so resume is unchanged) and the step's
    views equal the host path's to a uint8 level."""
    from jaxboost.data import vqa as vqa_lib
    from jaxboost.data.tokenize_bert import BertTokenizer
    from jaxboost.train import mumc_vqa
    base = ["data.augment=True", "data.size=32", "batch_size=4", "data.randaugment=()"]
    device = load_config("configs/mumc_vqa.py:tiny", base + ["data.augment_at=device"])
    rng, items = np.random.default_rng(0), []
    for i in range(4):   # at the training size: the device path then resamples the same pixels as PIL's
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)
        items.append(vqa_lib.VQAItem(str(i), path, "is this the chest?", "yes", "CLOSED"))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes"]) + "\n")
    tok = BertTokenizer.from_vocab(str(tmp_path / "vocab.txt"), 25)
    source = mumc_vqa.VQASource(items, mumc_vqa.ImageCache(SIZE), tok, 25, 0, decoded=True)
    first = next(iter(mumc_vqa.train_loader(source, device)))
    again = next(iter(mumc_vqa.train_loader(source, device)))
    assert first["crop_box"].shape == (4, 4) and first["flip"].shape == (4,)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    host = next(iter(mumc_vqa.train_loader(source, load_config("configs/mumc_vqa.py:tiny", base))))
    got = np.asarray(pipeline.device_preprocess(first, device)["images"])
    np.testing.assert_allclose(got, np.asarray(pipeline.device_preprocess(host, device)["images"]),
                               atol=2.5 / 255 / 0.26)
