"""A run's folder: where it is (etils.epath: local or gs://), who holds it (a lock that dies with the
process), and what it records (config.json as given, with absolute paths; run.json with resolved values).
Nothing here writes until the run is accepted (its checkpoint restored or absent)."""
from __future__ import annotations

import fcntl
import json
import os

from etils import epath
from ml_collections import ConfigDict

from jaxboost import jsonio, parallel

# Config fields that name local files or folders: stored absolute, so a run opens from any folder.
PATH_FIELDS = ("data.corpus", "data.eval_corpus", "data.tokenizer", "data.root", "data.caption_files",
               "data.image_roots", "init_from", "pretrained")


def resolve(path) -> epath.Path:
    """A workdir or data path: remote URLs (gs://...) as they are, local paths absolute."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _absolute(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_absolute(v) for v in value)
    return os.fspath(resolve(value)) if isinstance(value, str) and value else value


def with_absolute_paths(config: ConfigDict) -> ConfigDict:
    """A copy of `config` whose PATH_FIELDS are absolute (relative ones are read from the working folder)."""
    out = ConfigDict(config.to_dict())
    for field in PATH_FIELDS:
        node, *rest = field.split(".")
        if rest and node in out and rest[0] in out[node]:
            out[node][rest[0]] = _absolute(out[node][rest[0]])
        elif not rest and field in out:
            out[field] = _absolute(out[field])
    return out


class WorkdirBusyError(RuntimeError):
    pass


class WorkdirLock:
    """An exclusive flock on WORKDIR/.lock held by process 0 for the run's life; the kernel drops it when the
    process dies (kill -9 included). Remote workdirs are not locked (no flock on object stores)."""

    def __init__(self, workdir: epath.Path):
        self.path = epath.Path(workdir) / ".lock"
        self._fd = None

    def __enter__(self):
        if not parallel.is_main_process() or "://" in os.fspath(self.path):
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WorkdirBusyError(f"{self.path.parent} is in use by another run (pid {holder}); wait for it or "
                                   f"use another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_config(workdir) -> ConfigDict:
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {workdir} is not a jaxboost run directory")
    try:
        return ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def check_same_corpus(workdir, config: ConfigDict) -> None:
    """A resumed run continues on the data it started with: another corpus is refused by name."""
    path = epath.Path(workdir) / "config.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("data", {}).get("corpus", "")
    new = config.get("data", {}).get("corpus", "")
    if old and new and _absolute(old) != _absolute(new):
        raise ValueError(f"{workdir} was trained on config.data.corpus={old}, not {new}: resume it on its own "
                         f"corpus, or start a new --workdir (with --config.init_from={workdir} to continue)")


def record(workdir, config: ConfigDict, info: dict) -> None:
    """Writes config.json (as given) and run.json (resolved values) once the run is accepted; process 0."""
    if not parallel.is_main_process():
        return
    workdir = epath.Path(workdir)
    jsonio.write_atomic(workdir / "config.json", config.to_json_best_effort(indent=2).encode())
    jsonio.write_atomic(workdir / "run.json", jsonio.dumps(info).encode())


def read_info(workdir) -> dict:
    path = epath.Path(workdir) / "run.json"
    return json.loads(path.read_text()) if path.is_file() else {}
