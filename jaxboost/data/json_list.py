"""Reading a json file that must hold a list of items, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path


def read_json(path, missing: str):
    """`path` -> its parsed json; `missing` is the whole error message when the file is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_json_list(path, what: str, items: str) -> list:
    """`path` -> its json list; `what` names the file kind ("VQA file"), `items` the expected entries."""
    path = Path(path)
    data = read_json(path, f"{what} not found: {path}")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a json list of {items}, got {type(data).__name__}")
    return data
