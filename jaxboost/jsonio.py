"""Strict JSON out: every file jaxboost writes parses with any JSON reader (RFC 8259 has no NaN).

Python's json writes a NaN metric (an empty class, a structure never predicted) as a bare `NaN`, which
`jq`, JavaScript and most non-Python readers reject. Here NaN and +-inf become `null`: "no value", which is
what such a metric means. numpy scalars and arrays become numbers and lists, tuples lists.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from etils import epath


def jsonable(value):
    """`value` with NaN/inf -> None, numpy -> Python, tuples -> lists, dict keys -> str (recursively)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, indent: int | None = 2) -> str:
    """Strict JSON text of `value` (NaN/inf written as null)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False)


def write_atomic(path, data: bytes) -> None:
    """Write `data` to `path` (local or remote, through etils.epath) via a temporary file and a rename: a
    reader (or a crash) never sees half a file."""
    path = epath.Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path, value, indent: int | None = 2) -> epath.Path:
    """Strict JSON of `value` to `path`, atomically; returns the path."""
    write_atomic(path, (dumps(value, indent) + "\n").encode())
    return epath.Path(path)
