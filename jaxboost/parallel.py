"""Meshes, sharding rules and multi-host start-up: the one place every trainer and the sampler get them.

Axes: `data` (pure data parallel) and `fsdp` (data parallel whose parameters are also split). The batch is
split over both axes; parameters are replicated unless a rule (regex on the parameter path) or the FSDP
default puts their largest divisible dimension on `fsdp`. Everything goes through `jax.jit` with
`NamedSharding`s: XLA inserts the collectives; `jax.shard_map` is used only where a computation needs an
explicit one.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------------------- multi-host

def multi_process_expected(env=None) -> bool:
    """True when the platform says this process is one of several: SLURM with more than one task, Open MPI
    with more than one rank, a TPU VM pod slice (several worker hostnames, or a multislice coordinator)."""
    env = os.environ if env is None else env
    count = lambda name: int(env.get(name, "1") or "1")
    tpu_hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return (count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1 or len(tpu_hosts) > 1
            or "MEGASCALE_COORDINATOR_ADDRESS" in env)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 120,
                           local_device_ids: Sequence[int] | None = None) -> None:
    """Starts jax.distributed when more than one process is expected; a no-op for one process, or when
    it is already running.

    Order: explicit arguments; JAXBOOST_COORDINATOR / JAXBOOST_NUM_PROCESSES / JAXBOOST_PROCESS_ID; the
    platform (`multi_process_expected`: SLURM, Open MPI, TPU pods), whose values jax reads by itself.
    A coordinator that does not answer within `timeout_s` raises a clear RuntimeError naming it instead of
    hanging (processes other than 0 probe it first). Process 0 hosts the coordinator: when the other
    processes do not all arrive within `timeout_s`, the XLA runtime aborts it with DEADLINE_EXCEEDED.
    """
    env = os.environ
    coordinator = coordinator or env.get("JAXBOOST_COORDINATOR")
    num_processes = num_processes or (int(env["JAXBOOST_NUM_PROCESSES"]) if "JAXBOOST_NUM_PROCESSES" in env else None)
    process_id = process_id if process_id is not None else (
        int(env["JAXBOOST_PROCESS_ID"]) if "JAXBOOST_PROCESS_ID" in env else None)
    if coordinator is None and not multi_process_expected(env):
        return
    if num_processes == 1 or jax.distributed.is_initialized():
        return
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU collectives between processes (tests and local multi-process runs).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # Gloo gives a group of devices' first collective 30 s to find every peer ("Gloo context
        # initialization failed: GetKeyValue() timed out"). jax's persistent cache is written by process 0
        # only, under keys that differ per process: with a warm cache process 0 loads each program while
        # the others compile it, and a compile longer than 30 s failed process 0's first step (a CI run;
        # reproduced here under load). Without the cache every process compiles the same programs.
        jax.config.update("jax_enable_compilation_cache", False)
    if coordinator is not None and process_id not in (None, 0):
        # The XLA client aborts the whole process (C++ CHECK) when it cannot register in time, so an
        # unreachable coordinator is found here first, where it can still be a Python error.
        _wait_for_coordinator(coordinator, timeout_s, process_id, num_processes)
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                  initialization_timeout=timeout_s)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
    except Exception as e:  # jax raises a bare XlaRuntimeError/DEADLINE_EXCEEDED here
        raise RuntimeError(f"could not reach the jax.distributed coordinator {coordinator!r} within "
                           f"{timeout_s}s as process {process_id} of {num_processes}: {e}") from e
    log.info("jax.distributed: process %d/%d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


_barriers = itertools.count()


def wait_for_processes(name: str, timeout_s: float = 1800.0) -> None:
    """Every process waits here for the others; a no-op for one process. jax.distributed's key-value
    barrier, not a device collective, so its deadline is ours: called between compiling a program and its
    first run, it starts the program's collectives together however long each process took to compile
    (gloo's first collective over a group of devices gives up after 30 s)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client, as orbax's barriers use it
    distributed.global_state.client.wait_at_barrier(f"jaxboost/{name}/{next(_barriers)}", int(timeout_s * 1000))


def several_processes() -> bool:
    return jax.distributed.is_initialized() and jax.process_count() > 1


def shutdown_distributed() -> None:
    """Leaves jax.distributed as soon as a command's work is done, on every process (a no-op without it).

    Left to jax's atexit hook, a process enters the shutdown barrier only after the interpreter has joined
    any non-daemon threads it still runs; one that is late by more than
    `shutdown_timeout_seconds` is aborted with DEADLINE_EXCEEDED (a CI run saw process 1 aborted so, after
    both had trained). Called explicitly, the barrier comes right after the last collective."""
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()


def _wait_for_coordinator(coordinator: str, timeout_s: float, process_id, num_processes) -> None:
    """Polls a TCP connection to HOST:PORT until it opens; RuntimeError naming the address after timeout_s."""
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"coordinator address {coordinator!r} is not HOST:PORT")
    host = host.strip("[]")  # [::1]:1234
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"could not reach the jax.distributed coordinator {coordinator!r} within "
                               f"{timeout_s}s as process {process_id} of {num_processes}: {last_error}")
        try:
            socket.create_connection((host, int(port)), timeout=min(left, 2.0)).close()
            return
        except OSError as e:
            last_error = e
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))


def setup_compilation_cache(path: str | None = None) -> str | None:
    """Turns on jax's persistent compilation cache at `path`, else $JAX_COMPILATION_CACHE_DIR; a local
    folder or a gs:// path (jax writes through etils.epath). Returns the directory used, or None."""
    path = path or os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    if not path:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    return str(path)


# Threads of worker processes that run beside others on a few cores (the demo's segmenter workers). numpy's
# OpenBLAS starts one spinning thread per core for every matmul: the scorer's bilinear resize of each
# predicted mask ([320, 128] @ [128, 128] @ [128, 256], float64) took 23 ms with them and 1.9 ms with one,
# bit for bit the same (OpenBLAS splits the output, not the sums).
WORKER_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# glibc malloc keeping what it frees (no trimming of the heap's top, allocations up to 32 MiB from the heap):
# XLA:CPU frees and re-allocates each step's buffers, and returning them to the kernel re-faults every page
# on the next step. A 5-epoch demo CRIS run: 1.10 M -> 0.64 M minor page faults, 4.2 -> 2.9 s system CPU,
# the same validation Dice to the last bit.
WORKER_MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(1 << 28),
                     "MALLOC_MMAP_THRESHOLD_": str(1 << 25)}


@contextlib.contextmanager
def worker_env(env: dict[str, str] | None = None):
    """Inside: processes started (spawned) inherit WORKER_THREAD_ENV and WORKER_MALLOC_ENV (or `env`), read
    when they start and load their libraries. This process's own BLAS and XLA backend are set up first, so
    its threads stay as they are."""
    env = {**WORKER_THREAD_ENV, **WORKER_MALLOC_ENV} if env is None else env
    jax.devices()    # this process's XLA backend, with the flags it started with
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# Start-up flags every command accepts. The config one is also a config field (train/eval keep it in argv).
DISTRIBUTED_FLAGS = ("coordinator", "num_processes", "process_id")
CACHE_FLAG = "config.compilation_cache_dir"


def startup_flags(argv: Sequence[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(values of the start-up flags, argv without the distributed ones, argv without any start-up flag);
    both spellings, `--name=value` and `--name value`."""
    values, no_distributed, plain = {}, [], []
    argv, i = list(argv), 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in DISTRIBUTED_FLAGS + (CACHE_FLAG,):
            taken = argv[i:i + 1] if eq else argv[i:i + 2]
            values[name] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            no_distributed += taken if name == CACHE_FLAG else []
            i += len(taken)
            continue
        no_distributed.append(arg)
        plain.append(arg)
        i += 1
    return values, no_distributed, plain


def startup(argv: Sequence[str] = (), keep_config_flag: bool = True) -> list[str]:
    """What every jaxboost command runs before it touches a device: the persistent compilation cache
    (--config.compilation_cache_dir, else $JAX_COMPILATION_CACHE_DIR), then jax.distributed when the flags
    (--coordinator/--num_processes/--process_id), JAXBOOST_* or the platform say there are several
    processes (`jaxboost eval` and `synth` included, not only `train`). Returns argv without the flags it
    consumed (the config flag stays when `keep_config_flag`: train and eval apply it to the config)."""
    values, no_distributed, plain = startup_flags(argv)
    setup_compilation_cache(values.get(CACHE_FLAG))
    try:
        as_int = lambda name: int(values[name]) if values.get(name) else None
        num_processes, process_id = as_int("num_processes"), as_int("process_id")
    except ValueError as e:
        raise ValueError(f"--num_processes/--process_id must be integers: {e}") from e
    initialize_distributed(values.get("coordinator") or None, num_processes, process_id)
    return no_distributed if keep_config_flag else plain


def is_main_process() -> bool:
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------- mesh

def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; -1 fills the remaining devices."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data/fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if fsdp == -1:
        if n % data:
            raise ValueError(f"mesh: data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp} but there are {n} devices")
    # Auto axes: XLA propagates shardings and inserts the collectives (jax's default, Explicit, would make
    # every op on an FSDP-split kernel ask for an out_sharding).
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


def mesh_from_config(config) -> Mesh:
    mesh_cfg = config.get("mesh", None) or {}
    return make_mesh(int(mesh_cfg.get("data", -1)), int(mesh_cfg.get("fsdp", 1)))


def check_batch_divides(mesh: Mesh, global_batch: int) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise ValueError(f"batch_size={global_batch} is not divisible by the {n} batch shards of the mesh "
                         f"(data={mesh.shape['data']}, fsdp={mesh.shape['fsdp']})")
    if global_batch % jax.process_count():
        raise ValueError(f"batch_size={global_batch} is not divisible by {jax.process_count()} processes")


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(mesh: Mesh, host_batch: dict[str, Any]) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays split over the batch axes. Non-numeric fields are dropped
    (strings stay on the host: tokenize them before this call)."""
    out = {}
    for k, v in host_batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "biuf":
            continue
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def shard_global_batch(mesh: Mesh, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """A batch that every host holds whole (eval sets, fixed validation masks) -> global arrays split over
    the batch axes; each host places only its devices' rows. (`shard_batch` is for host-local parts.)"""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "biuf":
            continue
        out[k] = jax.make_array_from_callback(v.shape, batch_sharding(mesh, v.ndim), lambda index, v=v: v[index])
    return out


# ----------------------------------------------------------------------------------------- parameters

def _path_str(path) -> str:
    """'params/encoder/kernel' for a jax key path (dict keys, attributes and indices alike)."""
    def part(p):
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                return str(getattr(p, attr))
        return str(p)
    return "/".join(part(p) for p in path)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 14) -> P:
    """Puts the largest dimension divisible by the fsdp size on 'fsdp'; small tensors stay replicated."""
    if fsdp_size <= 1 or int(np.prod(shape)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def param_specs(params_shape, mesh: Mesh, rules: Sequence[tuple[str, P | str]] = (), fsdp_min_size: int = 2 ** 14):
    """A PartitionSpec per leaf: the first matching (regex, spec) rule wins, spec 'fsdp' means the FSDP
    default for that leaf; unmatched leaves use FSDP when the mesh has an fsdp axis > 1, else replicate."""
    fsdp_size = mesh.shape.get("fsdp", 1)
    compiled = [(re.compile(rx), spec) for rx, spec in rules]

    def spec_for(path, leaf):
        name = _path_str(path)
        for rx, spec in compiled:
            if rx.search(name):
                return fsdp_spec(leaf.shape, fsdp_size, fsdp_min_size) if spec == "fsdp" else spec
        return fsdp_spec(leaf.shape, fsdp_size, fsdp_min_size)

    return jax.tree_util.tree_map_with_path(spec_for, params_shape)


def shardings_for(tree_shape, mesh: Mesh, rules=(), fsdp_min_size: int = 2 ** 14):
    specs = param_specs(tree_shape, mesh, rules, fsdp_min_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def create_sharded(init_fn, mesh: Mesh, *args, rules=(), fsdp_min_size: int = 2 ** 14):
    """Runs `init_fn(*args)` under jit with its outputs created already sharded (never whole on one device)."""
    shape = jax.eval_shape(init_fn, *args)
    out_shardings = shardings_for(shape, mesh, rules, fsdp_min_size)
    return jax.jit(init_fn, out_shardings=out_shardings)(*args), out_shardings


def bytes_per_device(tree, shardings=None) -> int:
    """Bytes one device holds for `tree` (arrays or ShapeDtypeStructs) under `shardings`."""
    leaves = jax.tree.leaves(tree)
    shard_leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)) if shardings else [None] * len(leaves)
    total = 0
    for leaf, sh in zip(leaves, shard_leaves):
        shape = sh.shard_shape(leaf.shape) if sh is not None else leaf.shape
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total
