"""Metrics of a run: TensorBoard event files and one JSON line per write (WORKDIR/metrics.jsonl); only
process 0 writes. A resumed run first drops the rows past its restored step, so every step has one row."""
from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from jaxboost import jsonio, parallel


class MetricWriter:
    def __init__(self, workdir, resume_step: int | None = None):
        self.enabled = parallel.is_main_process()
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            if resume_step is not None:
                self._drop_rows_after(resume_step)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(epath.Path(workdir) / "tb"))

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
        with self.path.open("a") as f:
            f.write(jsonio.dumps({"step": int(step), "time": time.time(), **clean}, indent=None) + "\n")

    def close(self):
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir) -> list[dict]:
    p = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
