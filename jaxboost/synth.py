"""`jaxboost synth`: a synthetic triplet corpus sampled from a trained SDM (SPEC A3, issue 3 item 5).

  jaxboost synth --checkpoint RUN --masks CORPUS --out OUT --per-mask K --sampler ddim --steps 50 \
      --guidance 1.5 --seed S [--batch-size B] [--eta 0] [--splits train,val]

Every source image of a masks-corpus split (its multi-class mask and scan cone) is augmented K times
(affine + elastic, data/augment.py), turned into the model's label map, sampled with the run's EMA params and
written as 3 triplet records (LV, MYO, LA) with the source patient's metadata and prompts (source
"synthetic", prompts without image quality) into the same split name: synthetic train from real train masks,
synthetic val from real val masks; never test.

Determinism: sample s of split `split` (s = image index * K + k) draws its augmentation from
numpy default_rng([seed, split id, s]) and its diffusion noise from fold_in(fold_in(key(seed), split id), s).
Nothing depends on the batch, the device count or the host count, so the records are the same on 1 device,
8 devices or 2 hosts.

Hosts: host p of P samples s with s % P == p and writes them, in order, as writer p (its own shards); every
batch is one global array split over the mesh (each host fills its rows). Process 0 writes manifest.json
after a barrier (all writers closed).

Resume: a shard is complete once renamed from *.tmp; a rerun with the same settings samples only the samples
of shards not complete on disk, and ends with the same shards as an uninterrupted run. The settings are
stored in OUT/config.json, so a folder holding another corpus (other checkpoint, seed, K, ...) is refused.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost import parallel
from jaxboost.data import augment as augment_lib
from jaxboost.data import corpus as corpus_lib
from jaxboost.data import labels as labels_lib
from jaxboost.data import pipeline
from jaxboost.diffusion import samplers
from jaxboost.train import sdm as sdm_train

log = logging.getLogger(__name__)

RECORDS_PER_SAMPLE = len(labels_lib.STRUCTURES)
SYNTH_SPLITS = ("train", "val")
DEFAULT_PER_DEVICE_BATCH = 4


# ------------------------------------------------------------------------------------------ per sample

def model_labels(mask: np.ndarray, cone: np.ndarray, num_labels: int, where: str) -> np.ndarray:
    """CAMUS mask + cone [S, S] -> the label map the model was trained on (5: SDM labels with the cone;
    4: CAMUS labels)."""
    if mask.max(initial=0) >= labels_lib.NUM_CAMUS_LABELS:
        raise ValueError(f"{where}: mask label {int(mask.max())} is outside CAMUS labels 0-3")
    if num_labels == labels_lib.NUM_SDM_LABELS:
        return labels_lib.sdm_labels(mask, cone, is_cone=True)
    if num_labels == labels_lib.NUM_CAMUS_LABELS:
        return mask.astype(np.uint8)
    raise ValueError(f"{where}: the checkpoint's model has num_labels={num_labels}, but a masks corpus gives "
                     f"{labels_lib.NUM_CAMUS_LABELS} CAMUS labels ({labels_lib.NUM_SDM_LABELS} with the cone)")


def augmented_sample(source: dict, split_id: int, index: int, seed: int):
    """Sample `index` (= image index * K + k) of a split: (mask, cone) of the source under one augmentation
    draw from default_rng([seed, split id, index])."""
    rng = np.random.default_rng([seed, split_id, index])
    return augment_lib.augment_mask(source["mask"], rng, cone=source["cone"])


def sample_keys(seed: int, split_id: int, indices: np.ndarray) -> np.ndarray:
    """Raw key data [n, 2] of fold_in(fold_in(key(seed), split id), s) for each sample index s."""
    base = jax.random.fold_in(jax.random.key(seed), split_id)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))
    return np.asarray(jax.random.key_data(keys))


# ------------------------------------------------------------------------------------------ planning

def _shard_complete(out: Path, split: str, writer_id: int, index: int) -> bool:
    return (out / corpus_lib.shard_name(split, writer_id, index)).exists()


def needed(out: Path, split: str, writer_id: int, local_position: int, records_per_shard: int) -> bool:
    """Whether this writer's local sample at `local_position` has a record in a shard not yet complete."""
    first = local_position * RECORDS_PER_SAMPLE
    last = first + RECORDS_PER_SAMPLE - 1
    return any(not _shard_complete(out, split, writer_id, i)
               for i in range(first // records_per_shard, last // records_per_shard + 1))


def _allgather(value: int) -> np.ndarray:
    """[process_count] values, one per host."""
    if jax.process_count() == 1:
        return np.asarray([value])
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------------------------ generate

def generate(checkpoint, masks, out, per_mask: int, sampler: str = "ddim", steps: int = 50,
             guidance: float | None = 1.5, seed: int = 0, batch_size: int | None = None, eta: float = 0.0,
             splits=SYNTH_SPLITS, records_per_shard: int = corpus_lib.DEFAULT_RECORDS_PER_SHARD,
             progress: bool = True, mesh=None) -> dict:
    """Samples the synthetic corpus into `out` (resumable); returns its manifest (on every process).

    checkpoint: an SDM training run folder (config.json + ckpt/); masks: a corpus folder; guidance None, 0 or
    1 samples the conditional model only (1 is the same result at half the cost).
    batch_size: global samples per sampler call (default 4 per device), a multiple of the mesh's batch shards.
    mesh: default the run config's mesh over all devices.
    """
    checkpoint, masks, out = Path(checkpoint), Path(masks), Path(out)
    splits = tuple(splits.split(",")) if isinstance(splits, str) else tuple(splits)
    for split in splits:
        if split not in SYNTH_SPLITS:
            raise ValueError(f"--splits: {split!r} is not one of {SYNTH_SPLITS} (no synthetic test split)")
    if per_mask < 1:
        raise ValueError(f"--per-mask must be >= 1, got {per_mask}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if guidance is not None and float(guidance) in (0.0, 1.0):
        guidance = None
    samplers.sampler_spec(sampler, eta)  # an unknown sampler or an eta it has none of fails before any output
    source_corpus = corpus_lib.open_corpus(masks)

    # The model first: a folder that is not an SDM run fails before anything is written.
    probe = Path(checkpoint) / "config.json"
    if not probe.is_file():
        raise FileNotFoundError(f"{probe}: not found; --checkpoint {checkpoint} is not a jaxboost SDM run folder")
    import ml_collections
    config = ml_collections.ConfigDict(json.loads(probe.read_text()))
    if config.get("trainer") == "sdm":  # labels checked before the (slow) restore
        model_labels(np.zeros((1, 1), np.uint8), np.ones((1, 1), np.uint8), int(config.model.num_labels),
                     f"{checkpoint}/config.json")
    mesh = mesh or parallel.mesh_from_config(config)
    config, params, ckpt_step = sdm_train.load_run(checkpoint, mesh)
    size, channels, num_labels = config.model.image_size, config.model.in_channels, config.model.num_labels
    if source_corpus.size != size:
        raise ValueError(f"{masks}: masks corpus is {source_corpus.size} px but the SDM in {checkpoint} "
                         f"generates {size} px images; build the masks corpus at --size {size}")
    if guidance is not None:
        sdm_train.warn_unguided_training(config, guidance)

    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = batch_size or DEFAULT_PER_DEVICE_BATCH * shards
    parallel.check_batch_divides(mesh, batch_size)
    hosts, host = jax.process_count(), jax.process_index()
    local_batch = batch_size // hosts

    settings = {"checkpoint": str(checkpoint.absolute()), "checkpoint_step": int(ckpt_step),
                "masks": str(masks.absolute()), "per_mask": int(per_mask), "sampler": sampler, "steps": int(steps),
                "guidance": None if guidance is None else float(guidance), "eta": float(eta), "seed": int(seed),
                "splits": list(splits), "num_writers": hosts}
    extra_config = {"source": "synthetic", "synth": settings}
    # Process 0 claims the folder first (config.json), then every host opens its writer.
    if host == 0:
        corpus_lib.claim_folder(out, {"format": corpus_lib.FORMAT_NAME, "schema_version": corpus_lib.SCHEMA_VERSION,
                                      "size": size, "records_per_shard": int(records_per_shard), **extra_config})
    _barrier("synth_claim")
    writer = corpus_lib.CorpusWriter(out, size=size, source="synthetic", writer_id=host,
                                     records_per_shard=records_per_shard, extra_config=extra_config)

    dtype = None if config.sampler.get("dtype", "float32") == "float32" else jnp.dtype(config.sampler.dtype)
    run = samplers.make_sampler(
        sdm_train.apply_fn_for(sdm_train.build_model(config)), sdm_train.make_schedule(config), channels=channels,
        sampler=sampler, steps=steps, eta=eta, guidance=guidance, dtype=dtype)
    params = samplers.cast_params(params, dtype)  # once, not in every sampler call
    sample_fn = jax.jit(lambda p, labels, keys: run(p, sdm_train.one_hot_labels(labels, num_labels), keys))
    label_sharding = parallel.batch_sharding(mesh, 3)
    key_sharding = parallel.batch_sharding(mesh, 2)

    from tqdm.auto import tqdm
    t0, made = time.time(), 0
    for split_id, split in ((corpus_lib.SPLITS.index(s), s) for s in splits):
        sources = [r for r in source_corpus.iter(split) if pipeline.sdm_filter(r)]
        total = len(sources) * per_mask
        mine = list(range(host, total, hosts))  # this host's samples, in order
        todo = [j for j, s in enumerate(mine) if needed(out, split, host, j, records_per_shard)]
        todo_per_host = _allgather(len(todo))
        calls = -(-int(todo_per_host.max()) // local_batch)
        bar = tqdm(total=total, initial=total - int(todo_per_host.sum()), desc=f"synth {split}", unit="img", disable=not (progress and parallel.is_main_process()),
                   dynamic_ncols=True, mininterval=2.0)
        written = 0  # local samples handed to the writer so far (added or skipped)

        def hand_over(upto: int) -> None:  # skip complete samples before local position `upto`
            nonlocal written
            while written < upto:
                writer.skip(split, RECORDS_PER_SAMPLE)
                written += 1

        for call in range(calls):
            rows = todo[call * local_batch:(call + 1) * local_batch]
            label_maps, metas = [], []
            for j in rows:
                s = mine[j]
                src = sources[s // per_mask]
                aug_mask, aug_cone = augmented_sample(src, split_id, s, seed)
                where = f"{masks}/{split}/{src['key']}"
                label_maps.append(model_labels(aug_mask, aug_cone, num_labels, where))
                metas.append((j, s, src, aug_mask, aug_cone))
            # A host with fewer samples left pads its rows (every host runs the same number of calls).
            labels_np = np.stack(label_maps or [np.zeros((size, size), np.uint8)]).astype(np.int32)
            keys_np = sample_keys(seed, split_id, np.asarray([mine[j] for j in rows] or [0]))
            labels_np = np.concatenate([labels_np, np.repeat(labels_np[-1:], local_batch - len(labels_np), 0)])
            keys_np = np.concatenate([keys_np, np.repeat(keys_np[-1:], local_batch - len(keys_np), 0)])
            images = sample_fn(params, jax.make_array_from_process_local_data(label_sharding, labels_np),
                               jax.make_array_from_process_local_data(key_sharding, keys_np))
            local = np.concatenate([np.asarray(s.data) for s in
                                    sorted(images.addressable_shards, key=lambda s: s.index[0].start or 0)])
            pixels = sdm_train.images_to_uint8(local)
            for (j, s, src, aug_mask, aug_cone), image in zip(metas, pixels):
                hand_over(j)
                name = f"{src['key'].split('/')[1]}_aug{s % per_mask}"
                for record in corpus_lib.make_records(
                        image, aug_mask, name=name, patient=src["patient"], view=src["view"], phase=src["phase"],
                        sex=src["sex"], age=src["age"], quality=src["quality"], split=split, source="synthetic",
                        size=size, cone=aug_cone, drop_quality=True, keep_orig_mask=False):
                    writer.add(record)
                written += 1
            made += len(rows)
            bar.update(int(np.clip(todo_per_host - call * local_batch, 0, local_batch).sum()))
            bar.set_postfix(img_per_s=f"{made * hosts / max(time.time() - t0, 1e-9):.2f}")
        hand_over(len(mine))
        bar.close()
    writer.close()
    _barrier("synth_writers_closed")
    if host == 0:
        corpus_lib.finalize_corpus(out, expect_writers=hosts,
                                   source_info={"kind": "synthetic", **settings})
    _barrier("synth_finalized")
    manifest = json.loads((out / "manifest.json").read_text())
    if progress and parallel.is_main_process():
        print(f"[jaxboost] synth: {manifest['counts']} records in {out} ({made * hosts} images sampled in "
              f"{time.time() - t0:.1f}s)", flush=True)
    return manifest


# ------------------------------------------------------------------------------------------ CLI

def _guidance(value: str):
    return None if value.lower() in ("none", "off") else float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="SDM training run folder (config.json + ckpt/)")
    parser.add_argument("--masks", required=True, help="corpus whose masks condition the samples")
    parser.add_argument("--out", required=True, help="synthetic corpus folder (new, or an unfinished synth run)")
    parser.add_argument("--per-mask", type=int, required=True, help="augmented samples per source mask (K)")
    parser.add_argument("--sampler", default="ddim", choices=samplers.SAMPLERS.names())
    parser.add_argument("--steps", type=int, default=50, help="sampler steps (respaced from the training schedule)")
    parser.add_argument("--guidance", type=_guidance, default=1.5,
                        help="classifier-free guidance scale (none/1: conditional only)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="global samples per call (default 4/device)")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits of --masks to use")
    parser.add_argument("--records-per-shard", type=int, default=corpus_lib.DEFAULT_RECORDS_PER_SHARD)


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parallel.initialize_distributed()
    generate(args.checkpoint, args.masks, args.out, args.per_mask, sampler=args.sampler, steps=args.steps,
             guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, eta=args.eta, splits=args.splits,
             records_per_shard=args.records_per_shard)
    return 0
