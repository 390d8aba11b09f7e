"""A training run with a gs:// workdir end to end, orbax included: TensorStore's own gcs driver talks HTTP to
an in-process GCS JSON API server (tests/gcs_fake.py) backed by the same in-memory bucket that etils.epath
reaches through fsspec, so the checkpoints (async, max_to_keep) and every other workdir file land in one
bucket; the run stops, resumes from the bucket and ends where the uninterrupted local run ends."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import gcs_fake  # noqa: E402
import toy_task  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
    """One server per test process: TensorStore may keep the endpoint it first resolved."""
    with gcs_fake.FakeGCS() as fake:
        saved = {k: os.environ.get(k) for k in fake.env}
        os.environ.update(fake.env)
        stubbed = False
        try:
            from google.cloud import storage  # noqa: F401  (real client: STORAGE_EMULATOR_HOST points it here)
        except ImportError:
            sys.modules["google.cloud.storage"] = gcs_fake.storage_stub()
            stubbed = True
        yield fake
        if stubbed:
            sys.modules.pop("google.cloud.storage", None)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _config(total: int):
    # a constant learning rate: the 8-step and 12-step runs then share their schedule
    return toy_task.make_config(total, ckpt_every=4, log_every=4, **{"optim.schedule": "constant",
                                                                      "optim.warmup_steps": 0})


def test_gs_workdir_checkpoints_resume_exactly(bucket, tmp_path):
    from etils import epath
    full_state, _ = toy_task.run(str(tmp_path / "full"), _config(12))
    workdir = "gs://bucket/runs/toy"
    toy_task.run(workdir, _config(8))
    keys = sorted(gcs_fake.InMemoryGCS.store)
    assert "bucket/runs/toy/ckpt/8/commit_success.txt" in keys, keys
    assert any(k.startswith("bucket/runs/toy/ckpt/8/") and "/d/" in k for k in keys)   # TensorStore's arrays
    state, summary = toy_task.run(workdir, _config(12))
    assert summary["start_step"] == 8 and summary["final_step"] == 12
    for a, b in zip(np.asarray(full_state.params["w"]), np.asarray(state.params["w"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(full_state.params["b"]), np.asarray(state.params["b"]), rtol=1e-6)
    steps = sorted(int(p.name) for p in (epath.Path(workdir) / "ckpt").iterdir() if p.name.isdigit())
    assert steps == [4, 8, 12] and not Path("gs:").exists()
