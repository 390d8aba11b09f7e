"""MUMC's VQA training view (random resized crop, flip, RandAugment): the full config turns it on, the
training loader applies it (the evaluation view is the plain resize), and the same seed gives the same
batch."""
import numpy as np
from PIL import Image

from jaxboost.config import load_config
from jaxboost.data import caption_augment, vqa as vqa_lib
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.train import mumc_vqa


def _source(tmp_path, decoded):
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        path = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        items.append(vqa_lib.VQAItem(str(i), path, "is this the chest?", "yes", "CLOSED"))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes"]) + "\n")
    tok = BertTokenizer.from_vocab(str(tmp_path / "vocab.txt"), 25)
    return mumc_vqa.VQASource(items, mumc_vqa.ImageCache(32), tok, 25, 0, decoded=decoded)


def test_full_config_augments_like_mumc():
    d = load_config("configs/mumc_vqa.py:full").data
    assert d.augment and tuple(d.crop_scale) == (0.5, 1.0) and d.flip and tuple(d.randaugment) == (2, 7)


def test_training_loader_augments_and_repeats_with_the_seed(tmp_path):
    overrides = ["data.augment=True", "data.size=32", "batch_size=4"]
    config = load_config("configs/mumc_vqa.py:tiny", overrides + ["data.host_uint8=False"])
    source = _source(tmp_path, decoded=True)
    first = next(iter(mumc_vqa.train_loader(source, config)))
    again = next(iter(mumc_vqa.train_loader(source, config)))
    assert first["images"].shape == (4, 32, 32, 3) and first["images"].dtype == np.float32
    # the default hands the same augmented views to the step as uint8; the step normalises them
    as_uint8 = next(iter(mumc_vqa.train_loader(source, load_config("configs/mumc_vqa.py:tiny", overrides))))
    assert as_uint8["images"].dtype == np.uint8
    np.testing.assert_allclose(caption_augment.normalize(as_uint8["images"]), first["images"], atol=1e-6)
    np.testing.assert_array_equal(first["images"], again["images"])
    plain = np.stack([source.images(it.image_path) for it in source.items])
    for image in first["images"]:   # no augmented view equals the plain resize of any image
        assert min(np.abs(image - p).max() for p in plain) > 0.1
    expected = caption_augment.normalize(caption_augment.pretrain_augment(
        np.asarray(Image.open(source.items[0].image_path).convert("RGB")), None, 32))
    np.testing.assert_array_equal(plain[0], expected)


def test_vqa_teacher_runs_with_dropout_like_mumc():
    """MUMC's momentum model is in train mode: with the online model deterministic, only the teacher's
    dropout can make the loss depend on the rng."""
    import jax
    import jax.numpy as jnp
    from jaxboost.models import mumc
    model = mumc.VQAModel(image_size=16, pretrain_image_size=16, patch_size=8, vision_width=16, vision_depth=1,
                          vision_heads=2, vision_mlp_dim=32, vocab_size=20, text_width=16, text_depth=2,
                          text_heads=2, text_mlp_dim=32, fusion_layer=1, decoder_depth=1, max_position=16,
                          dropout_rate=0.3)
    ids = jnp.array([[2, 5, 6, 0]] * 2, jnp.int32)
    batch = {"images": jnp.ones((2, 16, 16, 3)), "question_ids": ids, "question_mask": (ids > 0).astype(jnp.int32),
             "answer_ids": ids, "answer_mask": (ids > 0).astype(jnp.int32)}
    params = model.init(jax.random.PRNGKey(0), batch["images"], ids, batch["question_mask"], ids,
                        batch["answer_mask"])["params"]
    loss = lambda seed, teacher_det: float(mumc.vqa_loss(model, params, params, batch, jax.random.PRNGKey(seed), 0.4,
                                                         deterministic=True, teacher_deterministic=teacher_det)[0])
    assert loss(1, True) == loss(2, True)
    assert loss(1, False) != loss(2, False)
    assert load_config("configs/mumc_vqa.py:full").teacher_dropout
