"""Metrics of a run: TensorBoard event files and one JSON line per write (WORKDIR/metrics.jsonl); only
process 0 writes. A resumed run first drops the rows past its restored step, so every step has one row.

`StepCost` adds what the compiled step costs: `mfu` (XLA's FLOP count of the compiled per-device program /
step time / the device's peak: the published bf16 peak of TPU v4/v5e/v5p/v6e, A100, H100, H200 from
benchmarks.harness, a measured f32 matmul rate on CPU) and `peak_memory_bytes` (the devices' own
peak_bytes_in_use where they report memory_stats, else XLA's buffer assignment of the step)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
from etils import epath

from jaxboost import jsonio, parallel


class MetricWriter:
    def __init__(self, workdir, resume_step: int | None = None):
        self.enabled = parallel.is_main_process()
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb, self._remote_rows = None, None
        if self.enabled:
            if resume_step is not None:
                self._drop_rows_after(resume_step)
            if "://" in os.fspath(self.path):
                self._remote_rows = ([line + "\n" for line in self.path.read_text().splitlines() if line.strip()]
                                     if self.path.exists() else [])
            from tensorboardX import SummaryWriter
            tb_dir = os.fspath(epath.Path(workdir) / "tb")
            if "://" in tb_dir:
                _register_epath_event_files(tb_dir.split("://")[0])
            self._tb = SummaryWriter(tb_dir)

    def _drop_rows_after(self, step: int) -> None:
        """Rows past the restored checkpoint were written by steps the resumed run replays."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        jsonio.write_atomic(self.path, "".join(line + "\n" for line in kept).encode())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        line = jsonio.dumps({"step": int(step), "time": time.time(), **clean}, indent=None) + "\n"
        if self._remote_rows is None:
            with self.path.open("a") as f:
                f.write(line)
            return
        # Object stores (gs://) have no append: the file is rewritten whole, from the rows held here.
        self._remote_rows.append(line)
        jsonio.write_atomic(self.path, "".join(self._remote_rows).encode())

    def close(self):
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


class _EpathEventFiles:
    """tensorboardX's writer factory for a URL scheme, through etils.epath: event files reach gs:// (or any
    filesystem epath reaches) the way every other output of a run does, with no second storage client."""

    def open(self, path):
        return _EpathEventFile(path)

    def directory_check(self, path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)


class _EpathEventFile:
    """An event file on an object store, which has no append: each flush writes the records since the last
    one as a new part, PATH.000001, ... (TensorBoard reads every file with "tfevents" in its name)."""

    def __init__(self, path):
        self.path, self._pending, self._parts = epath.Path(path), bytearray(), 0

    def write(self, data: bytes) -> None:
        self._pending += data

    def flush(self) -> None:
        if self._pending:
            self._parts += 1
            (self.path.parent / f"{self.path.name}.{self._parts:06d}").write_bytes(bytes(self._pending))
            self._pending = bytearray()

    def close(self) -> None:
        self.flush()


def _register_epath_event_files(scheme: str) -> None:
    from tensorboardX import record_writer
    record_writer.register_writer_factory(scheme, _EpathEventFiles())


def reference_peak() -> tuple[float, str]:
    """(FLOP/s, what it is) that `mfu` divides by; on a CPU a matmul rate measured once per process."""
    from benchmarks import harness
    return harness.reference_peak()


class StepCost:
    """From the compiled train step: FLOPs per device per step and a memory figure, once per run."""

    def __init__(self, compiled, devices):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float((cost or {}).get("flops", 0.0) or 0.0)
        self.peak_flops, self.peak_source = reference_peak()
        self.devices = list(devices)
        m = compiled.memory_analysis()
        # Everything the step holds at once: its arguments, outputs (less the donated, aliased ones) and
        # temporaries (as benchmarks.memory).
        self.compiled_bytes = (int(m.argument_size_in_bytes) + int(m.output_size_in_bytes)
                               - int(m.alias_size_in_bytes) + int(m.temp_size_in_bytes)) if m is not None else 0

    def peak_memory_bytes(self) -> int:
        stats = [d.memory_stats() for d in self.devices if d.process_index == jax_process_index()]
        peaks = [int(s["peak_bytes_in_use"]) for s in stats if s and "peak_bytes_in_use" in s]
        return max(peaks) if peaks else self.compiled_bytes

    def read(self, step_time_s: float | None) -> dict:
        out = {"peak_memory_bytes": float(self.peak_memory_bytes())}
        if step_time_s and self.flops:
            out["mfu"] = self.flops / step_time_s / self.peak_flops
        return out


def jax_process_index() -> int:
    import jax
    return jax.process_index()


def read_metrics(workdir) -> list[dict]:
    p = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
