"""SIGTERM (preemption) and SIGINT (Ctrl-C) set a flag; the loop saves at the next step boundary and exits
with the shell's code for the signal (143 / 130) and one line."""
from __future__ import annotations

import signal

import jax
import numpy as np

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(SystemExit):
    pass


class Preemption:
    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self):
        for sig in EXIT_CODES:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, the run cannot be preempted cleanly
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, step: int, check_every: int) -> bool:
        """All hosts must save at the same step: with several processes the flags are combined every
        `check_every` steps (one tiny all-gather), so no host saves alone and deadlocks."""
        if jax.process_count() == 1:
            return self.requested
        if step % check_every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.asarray(multihost_utils.process_allgather(np.int32(self.requested))).any())

    def exit(self, step: int, where) -> Preempted:
        sig = self.signal if self.signal is not None else signal.SIGTERM
        name = signal.Signals(sig).name
        print(f"[jaxboost] {name}: saved step {step} to {where}; exiting", flush=True)
        return Preempted(EXIT_CODES.get(sig, 143))
