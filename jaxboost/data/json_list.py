"""Reading a json file that must hold a list of items, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path

from etils import epath


def read_json(path, missing: str):
    """`path` (local or remote, through etils.epath) -> its parsed json; `missing` is the whole error message
    when the file is absent."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # its message carries the line and column
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text, so not JSON (byte {e.start}: {e.reason})") from None


# The json files of a save_pretrained tokenizer (or model) folder.
HF_FOLDER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json", "config.json")


def check_json_files(folder, names=HF_FOLDER_JSON) -> None:
    """Parse each of `names` present in `folder`, so a damaged file is named before a library that reads
    it (transformers, tokenizers) fails with a JSONDecodeError that names no file."""
    for name in names:
        path = Path(folder) / name
        if path.is_file():
            read_json(path, f"{path} not found")


def read_json_list(path, what: str, items: str) -> list:
    """`path` -> its json list; `what` names the file kind ("VQA file"), `items` the expected entries."""
    path = Path(path)
    data = read_json(path, f"{what} not found: {path}")
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a json list of {items}, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the list is empty (expected {items})")
    return data
