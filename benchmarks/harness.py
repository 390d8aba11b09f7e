"""Timing, FLOPs and reporting shared by every benchmark: one way to time JAX and PyTorch alike.

A case returns `Row`s; `run.py` prints them as one table and writes results.json (schema in
benchmarks/schema.md, version `SCHEMA_VERSION`), results.md and a PNG. Ratios are PyTorch time / JAX time
(> 1 means JAX is faster). MFU = model FLOPs (XLA cost analysis of the compiled step) / step time / the peak
rate (a device's published bf16 peak, `DEVICE_BF16_PEAK`, for bf16 steps on an accelerator; else the
machine's measured f32 matmul rate). The speed cases run both frameworks where and in the precision a
`Setting` says (`run.py --device/--dtype`, read back by each case's process from BENCH_DEVICE / BENCH_DTYPE).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Row:
    case: str                 # e.g. "clipseg/train_step"
    impl: str                 # "jax" | "torch eager" | "torch compile" | ...
    seconds: float            # median per call (per step, per sampling loop)
    items_per_s: float        # examples (images) per second
    flops: float | None = None
    mfu: float | None = None
    ratio_vs_jax: float | None = None  # this impl's time / jax time (torch rows); 1.0 for jax
    note: str = ""
    group: str = ""           # the runner's case name that produced the row ("clipseg", "time_to_dice")
    device: str = "cpu"       # where both frameworks ran: "cpu" | "gpu" (schema 3; older rows: cpu)
    dtype: str = "float32"    # the step's compute precision: "float32" | "bfloat16" (schema 3; older: float32)
    compile_s: float | None = None  # of `seconds`, those spent tracing and compiling (time_to_dice jax rows)

    @classmethod
    def from_json(cls, d: dict) -> "Row":
        """A row of results.json (any schema version: unknown keys are ignored, missing ones defaulted)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ------------------------------------------------------------------------------------ device and dtype
DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DEVICES = ("auto", "cpu", "gpu", "cuda")
# Relative tolerance of each correctness check (JAX vs torch outputs / losses, relative to the larger of 1 and
# the reference's largest magnitude). bf16: both sides round every matmul and convolution input to 8
# mantissa bits (relative 2^-8 = 3.9e-3 each), in a different order, through tens of layers.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


@dataclasses.dataclass(frozen=True)
class Setting:
    """Where and in which precision a speed case runs both frameworks.

    bfloat16 is mixed precision as the public code trains in it: float32 parameters and optimiser state,
    matmuls and convolutions in bf16 (flax modules' `dtype`; torch.autocast on the torch side, as
    HF Trainer's --bf16, CRIS.pytorch's amp and guided-diffusion's fp16 wrapper do), losses in float32.
    Off the float32 CPU default the torch references attend with scaled_dot_product_attention (HF models
    "sdpa"), and JAX's attention "auto" resolves per backend (layers.choose_attention: cuDNN flash
    attention for bf16 on a GPU, XLA's elsewhere)."""
    device: str = "cpu"      # "cpu" | "gpu"
    dtype: str = "float32"   # "float32" | "bfloat16"

    @property
    def bf16(self) -> bool:
        return self.dtype == "bfloat16"

    @property
    def tag(self) -> str:
        """What a case name carries: "" for float32 on a CPU (the names rows had before), else e.g.
        " bf16" or " bf16 gpu", so `bench compare` never sets one precision against another."""
        parts = (["bf16"] if self.bf16 else []) + (["gpu"] if self.device == "gpu" else [])
        return "".join(f" {p}" for p in parts)

    @property
    def jax_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def torch_device(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"

    @property
    def torch_sdpa(self) -> bool:
        """The torch references' attention: SDPA off the float32 CPU default (the rows measured before kept
        their eager attention, so comparisons with earlier runs stay like for like)."""
        return self.bf16 or self.device == "gpu"

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.dtype]

    def autocast(self):
        """torch.autocast in bf16 (a no-op context in float32) for the forward and the loss."""
        if not self.bf16:
            return contextlib.nullcontext()
        import torch
        return torch.autocast(self.torch_device, dtype=torch.bfloat16)

    def check(self, what: str, err: float) -> str:
        """Raise naming the dtype if `err` (relative) exceeds this dtype's tolerance; else the row's note."""
        if not err <= self.tolerance:  # NaN fails too
            raise AssertionError(f"{what}: JAX vs torch differ by {err:.3g} in {self.dtype} (relative; tolerance "
                                 f"{self.tolerance:g})")
        return f"{self.dtype} rel. err {err:.1e} (tol {self.tolerance:g})"

    def label(self, rows: list[Row]) -> list[Row]:
        for r in rows:
            r.device, r.dtype = self.device, self.dtype
        return rows


def resolve_device(device: str, backend: str | None = None) -> str:
    """"auto" -> "gpu" when JAX's default backend is a GPU, else "cpu"; "cuda" is "gpu". A GPU asked for
    where JAX has none is one clear error (the torch side alone on a GPU would time CPU against GPU)."""
    backend = backend or jax.default_backend()
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {DEVICES}")
    device = "gpu" if device == "cuda" else device
    if device == "auto":
        return "gpu" if backend == "gpu" else "cpu"
    if device == "gpu" and backend != "gpu":
        raise ValueError(f"device gpu: JAX's backend is {backend!r} (install jax[cuda] or use --device cpu)")
    return device


def setting(env=None) -> Setting:
    """The Setting of this process: BENCH_DEVICE (auto | cpu | gpu, default auto) and BENCH_DTYPE
    (float32 | bfloat16, default float32), which run.py's --device / --dtype export to every case."""
    env = os.environ if env is None else env
    dtype = env.get("BENCH_DTYPE", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"BENCH_DTYPE={dtype!r}: expected one of {sorted(set(DTYPES))}")
    return Setting(resolve_device(env.get("BENCH_DEVICE", "auto")), DTYPES[dtype])


def torch_attention(model, on: bool):
    """Switch every attention module of a torch reference (those with an `sdpa` attribute) to
    torch.nn.functional.scaled_dot_product_attention (`on`) or its explicit softmax(QK^T)V."""
    for m in model.modules():
        if hasattr(m, "sdpa"):
            m.sdpa = on
    return model


def time_call(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 5, sync: Callable[[Any], Any] | None = None,
              max_seconds: float = 60.0) -> float:
    """Median wall time of `fn()` after `warmup` calls; `sync(out)` blocks until the result is ready.
    BENCH_MAX_ITERS caps both counts (device_check.sh --dry-run: proves the paths, times nothing)."""
    sync = sync or (lambda out: jax.block_until_ready(out))
    cap = int(os.environ.get("BENCH_MAX_ITERS") or 0)
    if cap > 0:
        warmup, iters = min(warmup, cap), min(iters, cap)
    for _ in range(warmup):
        sync(fn())
    times, start = [], time.perf_counter()
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > max_seconds:
            break
    return statistics.median(times)


def torch_sync(out):
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def xla_flops(jitted, *args, trip_count: int = 1, **kwargs) -> float | None:
    """FLOPs of one call from XLA's cost analysis of the compiled program (None if unavailable).

    XLA's cost analysis counts the body of a while loop once, whatever its trip count (a 25-step
    `fori_loop` of a matmul reports one matmul), so a program that is one loop (the sampler) passes
    `trip_count`: the reported FLOPs are multiplied by it, which also multiplies the little work outside
    the loop (initial noise: negligible against the model calls). The compiled HLO must hold a while loop
    of exactly that known trip count, so a wrong count fails loudly instead of giving a wrong MFU.
    """
    captured = closed_over_bytes(jitted, *args, **kwargs)
    if captured > MAX_CLOSED_OVER_BYTES:
        raise ValueError(f"the timed function closes over {captured / 2 ** 20:.0f} MiB of arrays: pass weights and "
                         "inputs as arguments (XLA constant-folds captured arrays: minutes and gigabytes at full size)")
    try:
        compiled = jitted.lower(*args, **kwargs).compile()
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 — some backends give no cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    flops = float((cost or {}).get("flops", 0.0)) or None
    if trip_count != 1:
        counts = known_trip_counts(compiled.as_text())
        if trip_count not in counts:
            raise ValueError(f"trip_count={trip_count}, but the compiled program's while loops have known "
                             f"trip counts {counts}")
        flops = flops and flops * trip_count
    return flops


MAX_CLOSED_OVER_BYTES = 16 * 2 ** 20  # schedules and small tables are fine; weights and batches are not


def closed_over_bytes(fn, *args, **kwargs) -> int:
    """Bytes of the arrays `fn` captures instead of taking as arguments: the constants of its jaxpr and of
    every jaxpr nested in it (a `jax.jit` of a closure keeps them in its inner jaxpr)."""
    total, stack = 0, [jax.make_jaxpr(fn)(*args, **kwargs)]
    while stack:
        closed = stack.pop()
        total += sum(int(getattr(c, "nbytes", 0)) for c in closed.consts)
        for eqn in closed.jaxpr.eqns:
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if hasattr(sub, "consts") and hasattr(sub, "jaxpr"):
                        stack.append(sub)
    return total


def known_trip_counts(hlo_text: str) -> list[int]:
    """The trip counts XLA proved for the while loops of a compiled program (its `known_trip_count`)."""
    return [int(n) for n in re.findall(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)', hlo_text)]


_PEAK: dict[str, float] = {}


def peak_matmul_flops(dtype=jnp.float32, n: int | None = None) -> float:
    """Measured peak matmul rate of the default JAX device (FLOP/s): best of a few square matmuls. On a CPU
    both 1024 and 2048 square: a 2-core Zen 4 EPYC ran 1024 at 113 GFLOP/s and 2048 at ~200 (the CLIPSeg and
    SDM steps then read above 100% of the smaller one)."""
    key = f"{jax.default_backend()}:{jnp.dtype(dtype).name}"
    if key not in _PEAK:
        f = jax.jit(lambda a: a @ a)
        rates = []
        for size in [n] if n else [8192] if jax.default_backend() != "cpu" else [1024, 2048]:
            a = jnp.ones((size, size), dtype)
            t = min(time_call(lambda: f(a), warmup=2, iters=5) for _ in range(2))
            rates.append(2 * size ** 3 / t)
        _PEAK[key] = max(rates)
    return _PEAK[key]


def add_ratios(rows: list[Row]) -> list[Row]:
    by_case = {r.case: r for r in rows if r.impl == "jax"}
    for r in rows:
        j = by_case.get(r.case)
        if j is not None:
            r.ratio_vs_jax = r.seconds / j.seconds
    return rows


# Published dense bf16 peaks (FLOP/s, per chip; without sparsity) for MFU on accelerators, matched as a
# substring of the device kind (jax `device_kind` or torch's CUDA device name). Sources: Google Cloud TPU
# system-architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s), NVIDIA data sheets (A100 312,
# H100 SXM 989, H200 989 TFLOP/s; the PCIe/NVL H100 is 756).
DEVICE_BF16_PEAK = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100 PCIe": 756e12, "H100 NVL": 835e12,
    "H100": 989e12, "H200": 989e12,
}


def device_bf16_peak(kind: str) -> float | None:
    """The published bf16 peak of a device kind ("NVIDIA H200", "TPU v5 lite"), None if unknown; the
    longest matching name wins (so "H100 PCIe" is not read as the SXM part)."""
    hits = [k for k in DEVICE_BF16_PEAK if k.lower() in kind.lower()]
    return DEVICE_BF16_PEAK[max(hits, key=len)] if hits else None


def git_info() -> dict:
    """Commit of the benchmarked tree and whether it had uncommitted changes (None outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


# The instruction sets XLA:CPU's and oneDNN's kernels choose between: two CPUs sold under one model name
# ("AMD EPYC") differ here, and their step times by 2-4x.
CPU_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu_identity(cpuinfo: str | None = None) -> dict:
    """{"cpu": model name, "cpu_id": "vendor family F model M" with the ISA flags it has} from /proc/cpuinfo
    (`cpuinfo`: its text), or platform.processor() where there is none."""
    try:
        text = open("/proc/cpuinfo").read() if cpuinfo is None else cpuinfo
    except OSError:
        return {"cpu": platform.processor()}
    first = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if first:
                break   # one processor's block is enough
            continue
        first.setdefault(key.strip(), value.strip())
    if "model name" not in first:
        return {"cpu": platform.processor()}
    flags = set(first.get("flags", "").split())
    isa = "+".join(f for f in CPU_ISA_FLAGS if f in flags) or "no avx2"
    return {"cpu": first["model name"],
            "cpu_id": f"{first.get('vendor_id', '?')} family {first.get('cpu family', '?')} "
                      f"model {first.get('model', '?')} ({isa})"}


def machine_info() -> dict:
    import importlib.metadata as md
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()]}
    info.update(cpu_identity())
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "diffusers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    torch = sys.modules.get("torch")  # only if a case loaded it: importing torch costs seconds
    if torch is not None and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if jax.default_backend() != "cpu":
        info["device_kind"] = jax.devices()[0].device_kind
    info["load_avg_1min"] = os.getloadavg()[0]
    return info


def format_table(rows: list[Row]) -> str:
    head = "| case | impl | s/call | items/s | torch/jax time | GFLOP | MFU | note |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r.case} | {r.impl} | {r.seconds:.4f} | {r.items_per_s:.1f} | "
                     f"{'' if r.ratio_vs_jax is None else f'{r.ratio_vs_jax:.2f}x'} | "
                     f"{'' if not r.flops else f'{r.flops / 1e9:.1f}'} | "
                     f"{'' if r.mfu is None else f'{100 * r.mfu:.1f}%'} | {r.note} |")
    return "\n".join(lines)


SCHEMA_VERSION = 3


def results_document(rows: list[Row], cases: dict, **fields) -> dict:
    """The results.json document (benchmarks/schema.md): what ran, where, on which commit, and each row."""
    run_setting = setting()
    return {"schema_version": SCHEMA_VERSION,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_info(), "machine": machine_info(), "peak_matmul_flops_f32": dict(_PEAK),
            "device": run_setting.device, "dtype": run_setting.dtype,
            "mfu_peak": dict(zip(("flops", "source"), reference_peak(run_setting.dtype)))
            if _PEAK or jax.default_backend() != "cpu" else None,
            "cases": cases, "failed": [n for n, c in cases.items() if c.get("status") == "failed"],
            "rows": [dataclasses.asdict(r) for r in rows], **fields}


def write_results(out_dir: str | Path, document: dict, plot: bool = True) -> dict:
    """results.json (atomically: a reader or a crash mid-write never sees half a file), results.md and,
    with `plot`, speed.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(document, indent=2, default=float, allow_nan=True))
    os.replace(tmp, out_dir / "results.json")
    rows = [Row.from_json(r) for r in document["rows"]]
    (out_dir / "results.md").write_text(format_table(rows) + "\n")
    if plot:
        plot_ratios(out_dir / "speed.png", rows, title=f"jaxboost vs PyTorch ({document['machine'].get('jax_backend')}"
                                                      f", {str(document['git'].get('commit'))[:8]})")
    return document


def plot_ratios(path: str | Path, rows: list[Row], title: str = "jaxboost vs PyTorch",
                base_rows: list[Row] | None = None) -> bool:
    """Horizontal bars of PyTorch time / JAX time per case and PyTorch impl (green: JAX faster), with the
    baseline run's ratios beside them when given. False (no file) when no row has a ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ratio_rows = [r for r in rows if r.impl != "jax" and r.ratio_vs_jax and r.ratio_vs_jax == r.ratio_vs_jax]
    if not ratio_rows:
        return False
    base = {(r.case, r.impl): r.ratio_vs_jax for r in base_rows or [] if r.ratio_vs_jax}
    labels = [f"{r.case} vs {r.impl}" for r in ratio_rows]
    y = np.arange(len(ratio_rows))
    height = 0.4 if base else 0.8
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ratio_rows) + 1.8))
    ax.barh(y, [r.ratio_vs_jax for r in ratio_rows], height=height, label="this run",
            color=["tab:green" if r.ratio_vs_jax >= 1 else "tab:red" for r in ratio_rows])
    if base:
        ax.barh(y + height, [base.get((r.case, r.impl), 0.0) for r in ratio_rows], height=height,
                color="tab:gray", label="baseline")
    ax.set_yticks(y + (height / 2 if base else 0), labels)
    ax.axvline(1.0, color="k", lw=1, label="parity (1.0x)")
    ax.set_xlabel("PyTorch time / JAX time (> 1: JAX faster)")
    ax.set_ylabel("case vs PyTorch implementation")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def reference_peak(dtype: str | None = None) -> tuple[float, str]:
    """(FLOP/s, what it is) that MFU divides by for steps in `dtype` (default: this process's Setting): bf16
    on an accelerator, its published bf16 peak (the figure performance engineers quote); float32 anywhere, a
    CPU, or an unknown device, the f32 matmul rate measured here (an f32 step against a bf16 peak would
    read as a fraction of what the device could do in f32)."""
    dtype = dtype or setting().dtype
    if jax.default_backend() != "cpu" and dtype == "bfloat16":
        kind = jax.devices()[0].device_kind
        peak = device_bf16_peak(kind)
        if peak:
            return peak, f"published bf16 peak of {kind}"
    return peak_matmul_flops(), f"measured f32 matmul rate ({jax.default_backend()})"


def mfu(flops: float | None, seconds: float, peak: float | None = None) -> float | None:
    """Model FLOPs utilisation against `peak` (default: `reference_peak()` of this process's Setting)."""
    return None if not flops else flops / seconds / (peak or reference_peak()[0])


def np_seed(seed: int = 0):
    return np.random.default_rng(seed)


def torch_seg_train_step(forward, params, opt, autocast=contextlib.nullcontext):
    """A PyTorch segmenter train step like the JAX trainer's: `forward() -> (logits, target)` under
    `autocast()` (Setting.autocast), loss Dice + 0.2 BCE in float32, gradient clipping at 0.5 over
    `params`, then `opt.step()`."""
    import torch

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits, target = forward()
        logits = logits.float()
        probs = torch.sigmoid(logits)
        inter = (probs * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1e-5) / (probs.flatten(1).sum(1) + target.flatten(1).sum(1) + 1e-5)
        loss = dice.mean() + 0.2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        return loss
    return step


def time_product_step(step_fn: Callable, state, batch, *, iters: int = 5, warmup: int = 2
                      ) -> tuple[float, float | None]:
    """(median seconds, FLOPs) of a trainer's own train step (`task.step_fn` or the builder a trainer
    exposes), jitted with the state donated as `loop.fit` runs it, on one fixed device batch."""
    jitted = jax.jit(step_fn, donate_argnums=(0,))
    flops = xla_flops(jitted, state, batch)
    holder = [state]

    def call():
        holder[0], metrics = jitted(holder[0], batch)
        return metrics["loss"]
    return time_call(call, warmup=warmup, iters=iters), flops


def vl_seg_step(config_spec: str, overrides: list[str], module, variables, batch):
    """(step, state, batch) of `jaxboost train` for a CLIPSeg / CRIS module: vl_seg's loss, step (BatchNorm
    statistics kept by its post-update) and optimiser groups, from the config with `overrides`."""
    from jaxboost.config import load_config
    from jaxboost.train import optim, task as task_lib, vl_seg
    from jaxboost.train.state import initial_state
    config = load_config(config_spec, overrides)
    frozen, lr_mults = vl_seg.encoder_groups(config)
    tx = optim.make_optimizer(config, 1000, frozen=frozen, lr_mults=lr_mults)
    step = task_lib.make_train_step(vl_seg.make_loss_fn(config, module), tx, task_lib.keep_model_state)
    stats = {k: v for k, v in variables.items() if k != "params"} or None
    images, ids, mask, target = batch
    return step, initial_state(variables["params"], tx, 0, extra=stats), {
        "image": images, "input_ids": ids, "attention_mask": mask, "mask": target}


# ------------------------------------------------------------------------------------------ op profiles
# Where a step's time goes, by kind of operation, in both frameworks: `python -m benchmarks.speed_cris
# --profile` (also speed_sdm) prints the two tables side by side. XLA:CPU runs one thunk per HLO fusion or
# op (convolutions and dots as YNNPACK/oneDNN custom fusions or Eigen calls); jax.profiler records each thunk
# by its HLO name, which the compiled module maps to what it computes.

OP_KINDS = ("conv fwd", "conv bwd-data", "conv bwd-filter", "conv bwd", "conv dilated-input", "dot", "transpose/copy", "reduce", "elementwise",
            "other")


def _hlo_instruction_kinds(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> OP_KINDS entry, from a compiled module's text (fusions by what they call)."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = computations.setdefault(head.group(1), [])
        elif current is not None and line.strip().startswith(("%", "ROOT")):
            current.append(line)
    kinds = {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(", line)
            if not m:
                continue
            called = re.search(r"calls=%([\w.\-]+)", line)
            body = "\n".join(computations.get(called.group(1), [])) if called else line
            kinds[m.group(1)] = _kind_of(m.group(1), m.group(2), body)
    return kinds


def _kind_of(name: str, opcode: str, body: str) -> str:
    if "convolution(" in body:
        if "lhs_dilate" in body:  # a strided conv's data gradient, or a grouped conv's filter gradient rewritten
            return "conv dilated-input"  # by XLA:CPU: both run outside its convolution library
        window = re.search(r"window=\{size=([\dx]+)([^}]*)\}", body)
        # the filter gradient is an unstrided convolution whose window is the activation's spatial extent
        if window and math.prod(int(n) for n in window.group(1).split("x")) > 49 and "stride=" not in window.group(2):
            return "conv bwd-filter"
        return "conv bwd-data" if "transpose(jvp(" in body else "conv fwd"
    if " dot(" in body or opcode == "dot":
        return "dot"
    roots = [ln for ln in body.splitlines() if "ROOT" in ln] or [body]
    root_op = re.search(r"= \S+ ([\w\-]+)\(", roots[-1])
    root_op = root_op.group(1) if root_op else opcode
    if root_op in ("transpose", "copy") or name.startswith(("transpose", "copy")):
        return "transpose/copy"
    if " reduce(" in body or root_op in ("reduce", "reduce-window"):
        return "reduce"
    if opcode in ("fusion",) or root_op in ("add", "multiply", "select", "maximum", "exponential", "divide",
                                             "subtract", "broadcast", "convert", "tanh", "logistic", "rsqrt"):
        return "elementwise"
    return "other"


def xla_op_profile(jitted, *args, iters: int = 3) -> dict:
    """Per call: {"kinds": {kind: ms}, "top": [(thunk, kind, ms)], "wall_ms"} of a jitted function, from a
    jax.profiler trace of `iters` calls (after one warm-up), thunks mapped to kinds through the compiled HLO.
    Thunk times are summed over threads, so with 2 cores their total can exceed the wall time."""
    import collections
    import tempfile

    from jax.profiler import ProfileData
    compiled = jitted.lower(*args).compile()  # called directly: the jit cache would compile it again
    kinds = _hlo_instruction_kinds(compiled.as_text())
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        t = time.perf_counter()
        for _ in range(iters):
            jax.block_until_ready(compiled(*args))
        wall = (time.perf_counter() - t) / iters
        jax.profiler.stop_trace()
        trace = ProfileData.from_file(str(next(Path(d).rglob("*.xplane.pb"))))
    per_thunk = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for e in line.events:
                if e.name in kinds:
                    per_thunk[e.name] += e.duration_ns / 1e6 / iters
    by_kind = collections.Counter()
    for name, ms in per_thunk.items():
        by_kind[kinds[name]] += ms
    return {"kinds": dict(by_kind), "wall_ms": wall * 1e3,
            "top": [(n, kinds[n], ms) for n, ms in per_thunk.most_common(12)]}


def _torch_kind(op: str) -> str | None:
    """aten op -> OP_KINDS entry (None: a wrapper whose self time is counted in its children)."""
    if "convolution_backward" in op:
        return "conv bwd"  # torch computes the data and filter gradients in one op
    if "conv" in op and ("mkldnn" in op or "thnn" in op or op in ("aten::_convolution", "aten::convolution",
                                                                   "aten::conv2d", "aten::conv_transpose2d")):
        return "conv fwd"
    if op in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear") or \
            "scaled_dot_product" in op:
        return "dot"
    if op in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::permute", "aten::transpose", "aten::t",
              "aten::cat", "aten::_to_copy"):
        return "transpose/copy"
    if any(k in op for k in ("norm", "sum", "mean", "var", "max", "softmax")):
        return "reduce"
    return "elementwise"


def torch_op_profile(fn: Callable[[], Any], iters: int = 3) -> dict:
    """Per call: {"kinds": {kind: ms}, "top": [(op, kind, ms)], "wall_ms"} of a torch callable from
    torch.profiler's self CPU time per aten op (after one warm-up)."""
    import collections

    import torch
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        wall = (time.perf_counter() - t) / iters
    by_kind, per_op = collections.Counter(), collections.Counter()
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / iters
        if ms and e.key.startswith("aten::"):
            per_op[e.key] += ms
            by_kind[_torch_kind(e.key)] += ms
    return {"kinds": dict(by_kind), "wall_ms": wall * 1e3,
            "top": [(n, _torch_kind(n), ms) for n, ms in per_op.most_common(12)]}


def format_op_profiles(title: str, jax_profile: dict, torch_profile: dict) -> str:
    """The two profiles as one markdown table of ms per call by kind, then each side's top operations."""
    lines = [f"### {title}: ms per call by kind (JAX wall {jax_profile['wall_ms']:.1f} ms, torch eager wall "
             f"{torch_profile['wall_ms']:.1f} ms)", "", "| kind | JAX (XLA thunks) | torch eager (aten self) |",
             "|---|---|---|"]
    both = lambda p: {**p["kinds"], "conv bwd": sum(p["kinds"].get(k, 0.0) for k in (
        "conv bwd-data", "conv bwd-filter", "conv bwd", "conv dilated-input"))}
    jk, tk = both(jax_profile), both(torch_profile)
    for kind in OP_KINDS:
        j, t = jk.get(kind, 0.0), tk.get(kind, 0.0)
        if j or t:
            lines.append(f"| {kind} | {j:.1f} | {t:.1f} |")
    lines.append(f"| total | {sum(jax_profile['kinds'].values()):.1f} | {sum(torch_profile['kinds'].values()):.1f} |")
    lines.append("(conv bwd: data + filter gradients, dilated-input ones included; torch computes both in one "
                 "convolution_backward. Convolutions without jvp metadata count as fwd.)")
    for side, prof in (("JAX", jax_profile), ("torch", torch_profile)):
        lines += ["", f"{side} top ops: " + "; ".join(f"{n} ({k}) {ms:.1f}" for n, k, ms in prof["top"][:8])]
    return "\n".join(lines)
