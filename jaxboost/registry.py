"""Name -> implementation look-ups, so configs name things and no code branches on names.

Models: `jaxboost.models.<name>` exposes `Model` (a flax.linen Module class).
Trainers: `jaxboost.train.<name>` exposes `train(config, workdir)` and `evaluate(config, workdir, split)`.
Samplers, losses and other small families register functions with `Registry.register`.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def model_class(name: str):
    try:
        module = importlib.import_module(f"jaxboost.models.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"unknown model {name!r}: no module jaxboost.models.{name}") from e
    return module.Model


def trainer(name: str):
    try:
        return importlib.import_module(f"jaxboost.train.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"jaxboost.train.{name}":
            raise
        raise ValueError(f"unknown trainer {name!r}: no module jaxboost.train.{name}") from e


class Registry:
    """A named table of functions: `@SAMPLERS.register("ddim")`, then `SAMPLERS.get("ddim")`."""

    def __init__(self, kind: str):
        self.kind, self._table = kind, {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(fn):
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._table[name] = fn
            return fn
        return deco

    def get(self, name: str):
        if name not in self._table:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {sorted(self._table)}")
        return self._table[name]

    def names(self) -> list[str]:
        return sorted(self._table)
