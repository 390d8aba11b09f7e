"""Start-up of every command: jax.distributed whenever the platform or the flags say there are several
processes (eval included), and the persistent compilation cache from the config flag or the environment."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxboost import cli, parallel
from cpu_env import xla_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("env, expected", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True), ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3"}, True),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"}, True)])
def test_multi_process_is_read_from_the_platform(env, expected):
    assert parallel.multi_process_expected(env) is expected


def test_startup_flags_are_read_in_both_spellings_and_the_distributed_ones_consumed():
    argv = ["--config", "configs/sdm.py:tiny", "--coordinator=10.0.0.1:1234", "--num_processes", "2",
            "--process_id=1", "--config.compilation_cache_dir", "gs://bucket/xla", "--workdir", "w"]
    values, no_distributed, plain = parallel.startup_flags(argv)
    assert values == {"coordinator": "10.0.0.1:1234", "num_processes": "2", "process_id": "1",
                      "config.compilation_cache_dir": "gs://bucket/xla"}
    assert no_distributed == ["--config", "configs/sdm.py:tiny", "--config.compilation_cache_dir",
                              "gs://bucket/xla", "--workdir", "w"]
    assert plain == ["--config", "configs/sdm.py:tiny", "--workdir", "w"]


def test_every_command_runs_startup_first_eval_included(monkeypatch, tmp_path, capsys):
    calls = []
    real = parallel.startup
    monkeypatch.setattr(parallel, "startup", lambda argv, **kw: calls.append(list(argv)) or real(argv, **kw))
    # eval takes the start-up flags: it fails on the missing run, not on an unrecognised --num_processes
    assert cli.main(["eval", "--workdir", str(tmp_path / "missing"), "--num_processes=1"]) == 2
    err = capsys.readouterr().err
    assert "config.json: not found" in err and "num_processes" not in err
    assert calls == [["--workdir", str(tmp_path / "missing"), "--num_processes=1"]]
    assert cli.main(["phantom", "--out", str(tmp_path / "p"), "--patients", "1", "--size", "40", "32",
                     "--num_processes", "1"]) == 0
    assert len(calls) == 2 and (tmp_path / "p").is_dir()


def test_a_command_leaves_jax_distributed_only_when_it_succeeded(monkeypatch, tmp_path):
    """Success: the shutdown barrier right after the work; failure: not (the other processes may never come)."""
    left = []
    monkeypatch.setattr(parallel, "shutdown_distributed", lambda: left.append(True))
    assert cli.main(["eval", "--workdir", str(tmp_path / "missing")]) == 2
    assert left == []
    assert cli.main(["phantom", "--out", str(tmp_path / "p"), "--patients", "1", "--size", "40", "32"]) == 0
    assert left == [True]
    monkeypatch.undo()
    assert not jax.distributed.is_initialized()
    parallel.shutdown_distributed()  # one process: a no-op


_CACHE_PROBE = """
import sys, jax, jax.numpy as jnp
from jaxboost import parallel
parallel.startup(sys.argv[1:])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 3 + 1)(jnp.arange(7.0)).block_until_ready()
print("cache:", jax.config.jax_compilation_cache_dir)
"""


def _probe(args, env_cache=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1), "PYTHONPATH": str(REPO)}
    if env_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(env_cache)
    return subprocess.run([sys.executable, "-c", _CACHE_PROBE, *args], env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout).stdout


def test_compilation_cache_dir_flag_wins_over_the_environment_and_is_written(tmp_path):
    flag_dir, env_dir = tmp_path / "flag", tmp_path / "env"
    out = _probe([f"--config.compilation_cache_dir={flag_dir}"], env_cache=env_dir)
    assert f"cache: {flag_dir}" in out, out
    assert any(flag_dir.iterdir()) and not env_dir.exists()
    out = _probe([], env_cache=env_dir)
    assert f"cache: {env_dir}" in out, out
    assert any(env_dir.iterdir())


_DISTRIBUTED_PROBE = """
import sys, jax
from jaxboost import parallel
parallel.startup(sys.argv[1:])
parallel.startup(sys.argv[1:])   # a second call (the trainer's own) is a no-op
print("processes", jax.process_count(), "devices", jax.device_count(),
      "cache enabled", jax.config.jax_enable_compilation_cache)
"""


def _two_processes(probe: str, devices_each: int) -> list[subprocess.Popen]:
    """`probe` as processes 0 and 1 of a local jax.distributed run, started from the flags."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXBOOST_", "SLURM_"))}
    env |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices_each), "PYTHONPATH": str(REPO)}
    return [subprocess.Popen([sys.executable, "-c", probe, f"--coordinator=127.0.0.1:{port}", "--num_processes",
                              "2", f"--process_id={i}"], env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT) for i in range(2)]


def test_startup_joins_local_processes_from_the_flags(tmp_path):
    procs = _two_processes(_DISTRIBUTED_PROBE, devices_each=2)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "processes 2 devices 4" in out, out[-2000:]
    # Gloo's first collective waits 30 s for its peers and jax's cache serves process 0 only: no persistent
    # cache in a multi-process CPU run, so every process compiles the same programs.
    assert all("cache enabled False" in out for out in outs), outs


_FAILING_PROBE = """
import sys, time, jax
from jaxboost import cli
from jaxboost.data import phantom

def fail_on_process_0(args):
    if jax.process_index() == 0:
        raise ValueError("process 0 found bad input")
    time.sleep(150)   # process 1 still at work (in the real case: waiting on process 0 in a collective)
    return 0

phantom.main = fail_on_process_0
sys.exit(cli.main(["phantom", "--out", "unused", *sys.argv[1:]]))
"""


def test_a_failed_process_exits_at_once():
    """Left to jax's atexit hook, the failed process 0 would wait at the shutdown barrier until process 1
    ends, for up to 300 s (a CI run: process 1 waited on it in a collective, so both hung 300 s); it exits
    with its one-line error at once instead, and the launcher (or the coordinator's loss) stops the rest."""
    procs = _two_processes(_FAILING_PROBE, devices_each=1)
    try:
        out0 = procs[0].communicate(timeout=120)[0]   # process 1 sleeps 150 s
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 2 and "jaxboost: error: process 0 found bad input" in out0, out0[-2000:]


def test_local_launcher_sets_its_device_count_and_keeps_the_callers_other_xla_flags():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false")
    show = "import os; print(os.environ['XLA_FLAGS'].split())"
    out = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "3", sys.executable, "-c", show], env=env,
                         cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60).stdout
    lines = sorted(line for line in out.splitlines() if line.startswith("[p"))
    want = str(["--xla_cpu_enable_fast_math=false", "--xla_force_host_platform_device_count=3"])
    assert lines == [f"[p0] {want}", f"[p1] {want}"], out
