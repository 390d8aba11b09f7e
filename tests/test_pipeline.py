"""grain input pipeline: determinism, host split, exact resume (get/set_state and orbax), transforms."""
import numpy as np
import pytest

from jaxboost.data import corpus, phantom, pipeline

SIZE = 24


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = phantom.write_phantom(tmp_path_factory.mktemp("phantom"), patients=4, seed=1, fmt="nii", size=(40, 32))
    out = tmp_path_factory.mktemp("corpus") / "c"
    items, info = corpus.camus_items(root, size=SIZE, source="phantom")
    corpus.build_corpus(items, out, size=SIZE, source="phantom", records_per_shard=7, source_info=info)
    return out  # 4 patients: 1 test, 1 val, 2 train -> 24 train records


def _keys(loader, steps):
    it = iter(loader)
    return [list(next(it)["key"]) for _ in range(steps)]


def _loader(corpus_dir, **kwargs):
    defaults = dict(global_batch_size=4, seed=0, process_index=0, process_count=1)
    return pipeline.make_loader(corpus_dir, "train", **{**defaults, **kwargs})


def test_same_seed_same_batches_other_seed_other_order(corpus_dir):
    assert corpus.open_corpus(corpus_dir).split_len("train") == 24
    a = _keys(_loader(corpus_dir, seed=3), 5)
    assert a == _keys(_loader(corpus_dir, seed=3), 5)
    assert a != _keys(_loader(corpus_dir, seed=4), 5)


def test_hosts_get_disjoint_covering_shares(corpus_dir):
    per_host = []
    for host in range(2):
        loader = _loader(corpus_dir, global_batch_size=4, process_index=host, process_count=2, shuffle=False,
                         num_epochs=1)
        batches = list(loader)
        assert all(len(b["key"]) == 2 for b in batches)
        per_host.append([k for b in batches for k in b["key"]])
    assert not set(per_host[0]) & set(per_host[1])
    all_keys = {r["key"] for r in corpus.open_corpus(corpus_dir).iter("train")}
    assert set(per_host[0]) | set(per_host[1]) == all_keys


def test_iterator_state_restores_exact_position(corpus_dir):
    transform = pipeline.segmentation_transform(7)
    it = iter(_loader(corpus_dir, transform=transform, seed=9))
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(4)]  # crosses the 24-record epoch boundary (6 batches per epoch)
    fresh = iter(_loader(corpus_dir, transform=transform, seed=9))
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert list(got["key"]) == list(want["key"]) and list(got["prompt"]) == list(want["prompt"])
        np.testing.assert_array_equal(got["image"], want["image"])


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(corpus_dir, tmp_path):
    import grain.python as grain
    import orbax.checkpoint as ocp
    it = iter(_loader(corpus_dir, seed=1))
    for _ in range(2):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                               item_handlers={"data": grain.PyGrainCheckpointHandler()}) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.PyGrainCheckpointSave(it)))
        manager.wait_until_finished()
    expected = [list(next(it)["key"]) for _ in range(3)]
    restored = iter(_loader(corpus_dir, seed=1))
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                               item_handlers={"data": grain.PyGrainCheckpointHandler()}) as manager:
        manager.restore(2, args=ocp.args.Composite(data=grain.PyGrainCheckpointRestore(restored)))
    assert [list(next(restored)["key"]) for _ in range(3)] == expected


def test_segmentation_transform_outputs(corpus_dir):
    batch = next(iter(_loader(corpus_dir, transform=pipeline.segmentation_transform(6), global_batch_size=8)))
    assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["mask"].shape == (8, SIZE, SIZE) and set(np.unique(batch["mask"])) <= {0.0, 1.0}
    source = corpus.open_corpus(corpus_dir).source("train")
    by_key = {r["key"]: r for r in (source[i] for i in range(len(source)))}
    endings = set()
    for i, key in enumerate(batch["key"]):
        record = by_key[key]
        np.testing.assert_array_equal(batch["mask"][i], record["mask"] == record["label"])
        assert batch["prompt"][i] in record["prompts"][6]
        endings.add(record["prompts"][6].index(batch["prompt"][i]))
        assert batch["label"][i] == record["label"]
    assert endings == {0, 1}  # both endings are drawn


def test_sdm_transform_one_record_per_image(corpus_dir):
    loader = _loader(corpus_dir, transform=pipeline.sdm_transform(), shuffle=False, num_epochs=1,
                     global_batch_size=2)  # the transform brings its own one-record-per-image filter
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 8 and all(k.endswith("/LV") for k in keys)
    batch = batches[0]
    assert batch["image"].shape == (2, SIZE, SIZE, 1) and -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["labels"].dtype == np.int32 and set(np.unique(batch["labels"])) == {0, 1, 2, 3, 4}
    camus_labels = pipeline.sdm_transform(16, sdm_labels=False, channels=3)
    out = camus_labels(corpus.open_corpus(corpus_dir).source("train")[0], np.random.default_rng(0))
    assert out["image"].shape == (16, 16, 3) and out["labels"].max() <= 3


def test_raw_batches_and_bad_arguments(corpus_dir):
    batch = next(iter(_loader(corpus_dir)))
    assert batch["prompts"].shape == (4, 8, 2) and batch["image"].dtype == np.uint8 and "orig_mask" not in batch
    with pytest.raises(ValueError, match="not divisible"):
        _loader(corpus_dir, global_batch_size=3, process_count=2, process_index=0)
    with pytest.raises(ValueError, match="prompt_index"):
        pipeline.segmentation_transform(8)


def test_host_batches_become_global_arrays_on_the_mesh(corpus_dir):
    """The product's placement (`parallel.shard_batch`, as the trainers call it) of a real loader batch."""
    import jax
    from jaxboost import parallel
    mesh = parallel.make_mesh()
    batch = next(iter(_loader(corpus_dir, transform=pipeline.segmentation_transform(1),
                              global_batch_size=jax.device_count())))
    placed = parallel.shard_batch(mesh, batch)
    assert isinstance(placed["image"], jax.Array) and placed["image"].shape == batch["image"].shape
    assert len(placed["image"].sharding.device_set) == jax.device_count()
    np.testing.assert_array_equal(np.asarray(placed["mask"]), batch["mask"])
    assert "prompt" not in placed and "key" not in placed  # strings stay on the host


def _device_config(trainer, size, **data):
    import ml_collections
    return ml_collections.ConfigDict({"trainer": trainer, "data": {"size": size, **data},
                                      "model": {"in_channels": 1}})


@pytest.mark.parametrize("size", [SIZE, 2 * SIZE])
def test_device_preprocess_of_uint8_batches_gives_the_host_transforms_batches(corpus_dir, size):
    """host_uint8 + device_preprocess == the float host transforms: to an ulp at the corpus size; after a
    resize within PIL's uint8 rounding (images) and on nearly every pixel (nearest-neighbour masks)."""
    import jax
    loader = lambda t: next(iter(_loader(corpus_dir, transform=t, shuffle=False)))
    pairs = [("vl_seg", "mask", pipeline.segmentation_transform(3, size, ending=0, host_uint8=True),
              pipeline.segmentation_transform(3, size, ending=0)),
             ("sdm", "labels", pipeline.sdm_transform(size, host_uint8=True), pipeline.sdm_transform(size))]
    for trainer, field, device_side, host_side in pairs:
        raw, want = loader(device_side), loader(host_side)
        assert raw["image"].dtype == np.uint8 and raw["image"].shape == (4, SIZE, SIZE)
        assert raw["image"].nbytes * (12 if trainer == "vl_seg" else 4) == want["image"].nbytes * (SIZE / size) ** 2
        fn = jax.jit(lambda b: pipeline.device_preprocess(b, _device_config(trainer, size)))
        got = fn({k: v for k, v in raw.items() if v.dtype.kind in "iuf"})
        assert got["image"].dtype == want["image"].dtype and got["image"].shape == want["image"].shape
        assert got[field].dtype == want[field].dtype and got[field].shape == want[field].shape
        scale = 1 / 255 if trainer == "vl_seg" else 2 / 255
        if size == SIZE:   # XLA divides as a multiply by the reciprocal: an ulp of 1
            np.testing.assert_allclose(np.asarray(got["image"]), want["image"], rtol=0, atol=1.2e-7)
            np.testing.assert_array_equal(np.asarray(got[field]), want[field])
        else:
            np.testing.assert_allclose(np.asarray(got["image"]), want["image"], atol=1.01 * scale)
            assert np.mean(np.asarray(got[field]) == want[field]) > 0.97
        assert list(raw["key"]) == list(want["key"]) and list(raw.get("prompt", [])) == list(want.get("prompt", []))


def test_device_flips_are_per_example_and_seeded(corpus_dir):
    import jax
    raw = next(iter(_loader(corpus_dir, transform=pipeline.segmentation_transform(3, host_uint8=True))))
    batch = {"image": raw["image"], "mask": raw["mask"], "label": raw["label"]}
    config = _device_config("vl_seg", SIZE, hflip=True)
    plain = jax.device_get(pipeline.device_preprocess(batch, _device_config("vl_seg", SIZE)))

    def flips(seed):
        out = jax.device_get(pipeline.device_preprocess(batch, config, jax.random.key(seed)))
        decided = []
        for i in range(4):   # each example is itself or its mirror, image and mask together
            flipped = not np.array_equal(out["image"][i], plain["image"][i])
            want = (lambda x: x[:, ::-1]) if flipped else (lambda x: x)
            np.testing.assert_array_equal(out["image"][i], want(plain["image"][i]))
            np.testing.assert_array_equal(out["mask"][i], want(plain["mask"][i]))
            decided.append(flipped)
        return tuple(decided)

    assert flips(0) == flips(0)
    assert len({flips(s) for s in range(6)}) > 1


def test_loader_options_come_from_config_and_bad_values_are_named():
    import ml_collections
    from jaxboost.config import load_config
    assert pipeline.loader_options(load_config("configs/clipseg.py:full")) == {"worker_count": 8, "prefetch": 2}
    assert pipeline.loader_options(load_config("configs/clipseg.py:tiny")) == {"worker_count": 0, "prefetch": 2}
    with pytest.raises(ValueError, match="config.data.workers=-1"):
        pipeline.loader_options(ml_collections.ConfigDict({"data": {"workers": -1}}))


def test_prefetch_to_device_keeps_order_and_places_batches_on_the_mesh(corpus_dir):
    import jax
    from jaxboost import parallel
    mesh = parallel.make_mesh(4, 1, devices=jax.devices()[:4])
    host = [b for _, b in zip(range(5), _loader(corpus_dir, transform=pipeline.sdm_transform(host_uint8=True),
                                                shuffle=False))]
    out = list(pipeline.prefetch_to_device(iter(host), lambda n: parallel.batch_sharding(mesh, n), size=2))
    assert len(out) == 5
    for h, d in zip(host, out):
        assert isinstance(d["image"], jax.Array) and d["image"].sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
        assert list(d["key"]) == list(h["key"])


def test_unet_and_mumc_device_preprocess_equal_the_host_transforms(corpus_dir):
    """The U-Net's cast and MUMC's normalisation of the host's uint8 views, on device, against the host."""
    import functools
    import jax
    from jaxboost.data import caption_augment
    from jaxboost.train import unet_seg
    raw = next(iter(_loader(corpus_dir, shuffle=False, filter_fn=pipeline.sdm_filter,
                            transform=functools.partial(unet_seg.image_transform, size=SIZE, host_uint8=True))))
    want = next(iter(_loader(corpus_dir, shuffle=False, filter_fn=pipeline.sdm_filter,
                             transform=functools.partial(unet_seg.image_transform, size=SIZE))))
    assert raw["image"].dtype == np.uint8
    got = jax.jit(lambda b: pipeline.device_preprocess(b, _device_config("unet_seg", SIZE)))(raw)
    np.testing.assert_allclose(np.asarray(got["image"]), want["image"], rtol=0, atol=1.2e-7)
    np.testing.assert_array_equal(np.asarray(got["labels"]), want["labels"])
    views = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    for trainer in ("mumc_pretrain", "mumc_vqa"):
        got = jax.jit(lambda b: pipeline.device_preprocess(b, _device_config(trainer, SIZE)))({"images": views})
        np.testing.assert_allclose(np.asarray(got["images"]), caption_augment.normalize(views), rtol=0, atol=1e-6)


def test_device_flips_are_as_frequent_as_the_host_transforms(corpus_dir):
    """Random augmentation on device is not the host's draw for draw, but the same distribution: each
    example is mirrored with probability 1/2 on both paths (binomial, 4 sigma over 512 examples)."""
    import jax
    rec = next(iter(corpus.open_corpus(corpus_dir).iter("train")))
    host, plain = pipeline.segmentation_transform(3, hflip=True), pipeline.segmentation_transform(3)
    unflipped = plain(rec, np.random.default_rng(0))["image"]
    host_flips = [not np.array_equal(host(rec, np.random.default_rng(i))["image"], unflipped) for i in range(512)]
    batch = {"image": np.repeat(rec["image"][None], 512, 0), "mask": np.repeat(rec["mask"][None], 512, 0),
             "label": np.full((512,), rec["label"], np.int32)}
    out = jax.device_get(pipeline.device_preprocess(batch, _device_config("vl_seg", SIZE, hflip=True),
                                                    jax.random.key(0)))
    device_flips = [not np.array_equal(out["image"][i], out["image"][i, :, ::-1]) and
                    not np.allclose(out["image"][i], unflipped, atol=1e-6) for i in range(512)]
    for flips in (host_flips, device_flips):
        assert abs(np.mean(flips) - 0.5) < 4 * np.sqrt(0.25 / 512), np.mean(flips)


def test_global_order_is_a_permutation_per_epoch_with_grains_record_rngs():
    import grain.python as grain
    order = pipeline.GlobalOrder(10, seed=3, num_epochs=2)
    assert len(order) == 20
    keys = [order[i].record_key for i in range(20)]
    assert sorted(keys[:10]) == list(range(10)) == sorted(keys[10:]) and keys[:10] != keys[10:]
    assert keys == [pipeline.GlobalOrder(10, seed=3, num_epochs=2)[i].record_key for i in range(20)]
    assert [pipeline.GlobalOrder(10, seed=0, shuffle=False)[i].record_key for i in range(12)] == [*range(10), 0, 1]
    reference = grain.IndexSampler(10, grain.NoSharding(), shuffle=True, num_epochs=2, seed=3)
    assert order[7].rng.random() == reference[7].rng.random()
    with pytest.raises(IndexError):
        order[20]
