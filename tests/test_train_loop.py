"""The shared loop: optimiser groups against torch, exact resume after kill -9, corrupt checkpoints,
NaN stop, SIGTERM save, plateau LR against torch's ReduceLROnPlateau, config-mismatch errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from jaxboost.train import metrics_writer, optim
from cpu_env import xla_flags

TOY = Path(__file__).with_name("toy_task.py")


def run_toy(workdir, total, *kw, check=True, **popen):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    cmd = [sys.executable, str(TOY), str(workdir), str(total), "log_every=1", *kw]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if check and out.returncode:
        raise AssertionError(out.stdout)
    return out


def final_params(workdir):
    return np.load(Path(workdir) / "final_params.npy")


def test_optimizer_groups_match_torch_adamw():
    config = ml_collections.ConfigDict(dict(optim=dict(
        name="adamw", lr=0.1, weight_decay=0.01, schedule="constant", lr_mults={"backbone": 0.1},
        frozen=["frozen"])))
    tx = optim.make_optimizer(config, total_steps=10)
    rng = np.random.default_rng(0)
    p0 = {k: rng.normal(size=(3,)).astype(np.float32) for k in ("backbone", "head", "frozen")}
    grads = [{k: rng.normal(size=(3,)).astype(np.float32) for k in p0} for _ in range(3)]
    params, state = jax.tree.map(jnp.asarray, p0), tx.init(p0)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    opt = torch.optim.AdamW([{"params": [tp["head"]], "lr": 0.1}, {"params": [tp["backbone"]], "lr": 0.01}],
                            weight_decay=0.01)
    for g in grads:
        for k in ("head", "backbone"):
            tp[k].grad = torch.tensor(g[k])
        opt.step()
    for k in ("head", "backbone"):
        np.testing.assert_allclose(params[k], tp[k].detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params["frozen"], p0["frozen"])  # no update, no weight decay


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(tmp_path):
    run_toy(tmp_path / "clean", 30)
    for seed in (1, 2):
        wd = tmp_path / f"killed{seed}"
        proc = run_toy(wd, 30, "sleep=0.15", "ckpt_every=4", popen=True)
        delay = np.random.default_rng(seed).uniform(1.5, 3.5)
        deadline = time.time() + 60
        while time.time() < deadline and not any((wd / "ckpt").glob("[0-9]*")):
            time.sleep(0.1)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (wd / "final_params.npy").exists(), "the kill came too late to test anything"
        out = run_toy(wd, 30)
        assert "resumed" in out.stdout
        np.testing.assert_array_equal(final_params(wd), final_params(tmp_path / "clean"))


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
    run_toy(tmp_path / "clean", 20)
    wd = tmp_path / "run"
    run_toy(wd, 20, "ckpt_every=5", "async_checkpointing=False")
    victim = max((wd / "ckpt").glob("[0-9]*"), key=lambda p: int(p.name))
    for f in (victim / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    (wd / "final_params.npy").unlink()
    out = run_toy(wd, 20)
    assert f"ckpt/{victim.name} is corrupt" in out.stdout
    assert "resumed" in out.stdout and "at step 15" in out.stdout
    np.testing.assert_array_equal(final_params(wd), final_params(tmp_path / "clean"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # Sample 5 of 64 is NaN; with shuffling it appears in some batch of the first epoch (8 steps).
    out = run_toy(tmp_path, 30, "nan_at=5", "ckpt_every=1", "async_checkpointing=False", check=False)
    assert out.returncode != 0
    assert "FloatingPointError: loss is nan at step" in out.stdout
    assert "Last good checkpoint" in out.stdout
    steps = sorted(int(p.name) for p in (tmp_path / "ckpt").glob("[0-9]*"))
    bad = int(out.stdout.split("loss is nan at step ")[1].split(";")[0])
    assert steps and max(steps) == bad - 1


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_then_exit(tmp_path, sig, code):
    proc = run_toy(tmp_path, 200, "sleep=0.1", "ckpt_every=1000", popen=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert f"{signal.Signals(sig).name}: saved step" in out and "Traceback" not in out
    saved = max(int(p.name) for p in (tmp_path / "ckpt").glob("[0-9]*"))
    # the resumed run replays nothing: one row per step
    run_toy(tmp_path, saved + 3)
    steps = [m["step"] for m in metrics_writer.read_metrics(tmp_path) if "train/loss" in m]
    assert steps == list(range(1, saved + 4))


def test_checkpoint_from_other_config_names_keys_and_leaves_the_run_as_it_was(tmp_path):
    run_toy(tmp_path, 5)
    before = {p.name: p.read_bytes() for p in (tmp_path / "config.json", tmp_path / "metrics.jsonl")}
    out = run_toy(tmp_path, 10, "width=6", check=False)
    assert out.returncode != 0 and "different config" in out.stdout
    assert {p: (tmp_path / p).read_bytes() for p in before} == before


def test_plateau_lr_matches_torch_reduce_lr_on_plateau(tmp_path):
    values = [0.5, 0.6, 0.6, 0.59, 0.6, 0.58, 0.7, 0.7, 0.69, 0.68, 0.7, 0.7, 0.71, 0.6]
    run_toy(tmp_path, len(values), "eval_every=1", "plateau_patience=2", "best_metric=val/score",
            f"eval_values={values!r}".replace(" ", ""))
    logged = {m["step"]: m for m in metrics_writer.read_metrics(tmp_path) if "train/lr_scale" in m}
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=2, factor=0.1, threshold=0.0)
    ours = []
    for step, v in enumerate(values, start=1):
        sched.step(v)
        # lr_scale logged at step s+1 is the one set by the eval after step s.
        if step + 1 in logged:
            ours.append((logged[step + 1]["train/lr_scale"], opt.param_groups[0]["lr"]))
    assert any(t < 1.0 for _, t in ours), "the sequence must trigger a reduction"
    np.testing.assert_allclose([o for o, _ in ours], [t for _, t in ours], rtol=1e-6)


def test_async_best_checkpoint_holds_the_best_steps_state(tmp_path):
    # The best step's state is saved asynchronously while the next steps run (and donate their input state):
    # it must hold that step's arrays, the same as the latest checkpoint of that step.
    values = [0.1, 0.2, 0.9, 0.3, 0.4, 0.5]
    run_toy(tmp_path, len(values), "eval_every=1", "ckpt_every=1", "keep_checkpoints=10", "best_metric=val/score",
            f"eval_values={values!r}".replace(" ", ""))
    import orbax.checkpoint as ocp
    assert sorted(p.name for p in (tmp_path / "best").glob("[0-9]*")) == ["3"]
    best = ocp.StandardCheckpointer().restore(tmp_path / "best" / "3" / "state")
    latest = ocp.StandardCheckpointer().restore(tmp_path / "ckpt" / "3" / "state")
    assert int(best["step"]) == 3
    jax.tree.map(np.testing.assert_array_equal, best["params"], latest["params"])
    jax.tree.map(np.testing.assert_array_equal, best["opt_state"], latest["opt_state"])


def test_compile_clock_counts_a_new_programs_compile_and_not_a_cached_call():
    from jaxboost.train import loop
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + jnp.sin(x) ** 2)   # a program no other test compiles
    clock = loop.compile_clock()
    f(jnp.arange(17.0)).block_until_ready()
    compiled = clock()
    assert compiled > 0
    f(jnp.arange(17.0)).block_until_ready()
    assert clock() == compiled  # the cached call adds nothing
