"""Timing, FLOPs and reporting shared by every benchmark: one way to time JAX and PyTorch alike.

A case returns `Row`s; `run.py` prints them as one table, writes results.json, results.md and a PNG.
Ratios are PyTorch time / JAX time (> 1 means JAX is faster). MFU = model FLOPs (XLA cost analysis of the
compiled step) / step time / the machine's measured peak matmul rate.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
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


def time_call(fn: Callable[[], Any], *, warmup: int = 2, iters: int = 5, sync: Callable[[Any], Any] | None = None,
              max_seconds: float = 60.0) -> float:
    """Median wall time of `fn()` after `warmup` calls; `sync(out)` blocks until the result is ready."""
    sync = sync or (lambda out: jax.block_until_ready(out))
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


def xla_flops(jitted, *args, **kwargs) -> float | None:
    """FLOPs of one call from XLA's cost analysis of the compiled program (None if unavailable)."""
    try:
        cost = jitted.lower(*args, **kwargs).compile().cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 — some backends give no cost analysis
        return None


_PEAK: dict[str, float] = {}


def peak_matmul_flops(dtype=jnp.float32, n: int | None = None) -> float:
    """Measured peak matmul rate of the default JAX device (FLOP/s): best of a few square matmuls."""
    key = f"{jax.default_backend()}:{jnp.dtype(dtype).name}"
    if key not in _PEAK:
        n = n or (8192 if jax.default_backend() != "cpu" else 1024)
        a = jnp.ones((n, n), dtype)
        f = jax.jit(lambda a: a @ a)
        t = min(time_call(lambda: f(a), warmup=2, iters=5) for _ in range(2))
        _PEAK[key] = 2 * n ** 3 / t
    return _PEAK[key]


def add_ratios(rows: list[Row]) -> list[Row]:
    by_case = {r.case: r for r in rows if r.impl == "jax"}
    for r in rows:
        j = by_case.get(r.case)
        if j is not None:
            r.ratio_vs_jax = r.seconds / j.seconds
    return rows


def machine_info() -> dict:
    import importlib.metadata as md
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()]}
    try:
        info["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "diffusers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
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


def write_results(out_dir: str | Path, rows: list[Row], extra: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "peak_matmul_flops_f32": _PEAK, "rows": [dataclasses.asdict(r) for r in rows],
              **(extra or {})}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (out_dir / "results.md").write_text(format_table(rows) + "\n")
    _plot(out_dir / "speed.png", rows)
    return result


def _plot(path: Path, rows: list[Row]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    torch_rows = [r for r in rows if r.impl != "jax" and r.ratio_vs_jax]
    if not torch_rows:
        return
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(torch_rows) + 1.5))
    labels = [f"{r.case} vs {r.impl}" for r in torch_rows]
    ax.barh(labels, [r.ratio_vs_jax for r in torch_rows], color=["tab:green" if r.ratio_vs_jax >= 1 else "tab:red"
                                                                  for r in torch_rows])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("PyTorch time / JAX time (>1: JAX faster)")
    ax.set_title(f"jaxboost speed ({jax.default_backend()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mfu(flops: float | None, seconds: float) -> float | None:
    return None if not flops else flops / seconds / peak_matmul_flops()


def np_seed(seed: int = 0):
    return np.random.default_rng(seed)


def torch_seg_train_step(forward, params, opt):
    """A PyTorch segmenter train step like the JAX trainer's: `forward() -> (logits, target)`, loss Dice +
    0.2 BCE, gradient clipping at 0.5 over `params`, then `opt.step()`."""
    import torch

    def step():
        opt.zero_grad(set_to_none=True)
        logits, target = forward()
        probs = torch.sigmoid(logits)
        inter = (probs * target).flatten(1).sum(1)
        dice = 1 - (2 * inter + 1e-5) / (probs.flatten(1).sum(1) + target.flatten(1).sum(1) + 1e-5)
        loss = dice.mean() + 0.2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        return loss
    return step


def time_product_step(step_fn: Callable, state, batch, *, iters: int = 5) -> tuple[float, float | None]:
    """(median seconds, FLOPs) of a trainer's own train step (`task.step_fn` or the builder a trainer
    exposes), jitted with the state donated as `loop.fit` runs it, on one fixed device batch."""
    jitted = jax.jit(step_fn, donate_argnums=(0,))
    flops = xla_flops(jitted, state, batch)
    holder = [state]

    def call():
        holder[0], metrics = jitted(holder[0], batch)
        return metrics["loss"]
    return time_call(call, iters=iters), flops


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
