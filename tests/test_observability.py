"""What the loop records about its steps: a jax.profiler trace of the steps `profile_steps` names (in
TensorBoard's profile plugin layout), and mfu / peak_memory_bytes beside step_time_s in metrics.jsonl and
TensorBoard; a gs:// workdir on an in-process (non-local) filesystem."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import toy_task  # noqa: E402

from jaxboost.train import loop, metrics_writer  # noqa: E402


def _toy_config(total: int, **fields):
    config = toy_task.make_config(total, ckpt_every=0, async_checkpointing=False)
    config.update(fields)
    return config


def test_profile_steps_trace_and_cost_metrics(tmp_path):
    workdir = tmp_path / "run"
    toy_task.run(str(workdir), _toy_config(5, profile_steps="2,3"))
    traces = list((workdir / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    rows = [r for r in metrics_writer.read_metrics(workdir) if "train/loss" in r]
    timed = [r for r in rows if "train/step_time_s" in r]
    assert timed, rows
    for row in timed:
        assert 0 < row["train/mfu"] < 1, row        # XLA FLOPs / step time / the measured CPU matmul peak
        assert row["train/peak_memory_bytes"] > 0   # CPU has no memory_stats: the compiled step's buffers
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(workdir / "tb"))
    events.Reload()
    assert {"train/mfu", "train/peak_memory_bytes", "train/step_time_s"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize("value", ["3", "a,b", "0,2", "5,4"])
def test_bad_profile_steps_are_named(value):
    with pytest.raises(ValueError, match="config.profile_steps"):
        loop.profile_window(_toy_config(2, profile_steps=value))


def test_profile_window_past_the_run_ends_with_the_run(tmp_path):
    workdir = tmp_path / "run"
    toy_task.run(str(workdir), _toy_config(3, profile_steps="2,9"))
    assert list((workdir / "plugins" / "profile").glob("*/*.xplane.pb"))


# ------------------------------------------------------------------------------------ gs:// workdirs
class _InMemoryGCS:
    """An in-process stand-in for gs:// (fsspec's memory filesystem under the gs protocol): what the run
    writes there goes through etils.epath -> fsspec, as it would with gcsfs, and never touches the disk."""

    @staticmethod
    def register():
        import fsspec
        from fsspec.implementations.memory import MemoryFileSystem

        class InMemoryGCS(MemoryFileSystem):
            protocol = ("gs",)
            store, pseudo_dirs = {}, [""]

            @classmethod
            def _strip_protocol(cls, path):
                path = str(path)
                return super()._strip_protocol(path[len("gs://"):] if path.startswith("gs://") else path)

        for name in ("gs", "gcs"):  # etils asks fsspec for "gcs"
            fsspec.register_implementation(name, InMemoryGCS, clobber=True)
        return InMemoryGCS


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
    """gs:// on the in-memory filesystem; orbax's arrays go to a local folder instead (see the test)."""
    import importlib
    from etils.epath import backend
    from jaxboost.train import checkpoints
    registry = importlib.import_module("fsspec.registry")._registry
    before = dict(registry)
    fs_class = _InMemoryGCS.register()
    backend.fsspec_backend._get_filesystem.cache_clear()
    local = tmp_path / "ckpt-local"

    class LocalCheckpoints(checkpoints.Checkpoints):
        def __init__(self, workdir, *args, **kwargs):
            assert str(workdir).startswith("gs://")
            super().__init__(local / str(workdir)[len("gs://"):], *args, **kwargs)

    monkeypatch.setattr(loop.ckpt_lib, "Checkpoints", LocalCheckpoints)
    yield fs_class, local
    fs_class.store.clear()
    registry.clear()
    registry.update(before)
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_workdir_holds_config_run_metrics_and_tensorboard(fake_gcs):
    """Orbax writes its arrays through TensorStore's own gcs driver (HTTP to the bucket), not through epath
    or fsspec, so no in-process filesystem can stand in for it: the checkpoints of this run go to a local
    folder and everything else to the fake bucket."""
    from etils import epath
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    fs_class, local = fake_gcs
    workdir = "gs://bucket/runs/toy"
    toy_task.run(workdir, _toy_config(4, log_every=2))
    root = epath.Path(workdir)
    assert json.loads((root / "config.json").read_text())["total_steps"] == 4
    assert json.loads((root / "run.json").read_text())["total_steps"] == 4
    rows = metrics_writer.read_metrics(workdir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    events = list((root / "tb").iterdir())
    assert events and all("tfevents" in p.name for p in events)
    assert not Path("gs:").exists() and not any(k.startswith("gs:") for k in fs_class.store if "//" in k)
    tb = local / "tb"
    tb.mkdir()
    for p in events:
        (tb / p.name).write_bytes(p.read_bytes())
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert (local / "bucket/runs/toy/ckpt/4").is_dir()
