"""The one tokenizer set-up of every run: WORKDIR/tokenizer, written once and then only read.

Process 0 fills a temporary folder (a copy of a given tokenizer, or one trained on the run's texts) and renames
it into place atomically; the other processes wait for the folder. Restarts, `jaxboost eval` and finetunes
(init_from) read it back, so a run reads its text as it was trained with."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Callable

from etils import epath

from jaxboost import parallel

TOKENIZER_DIR = "tokenizer"
READY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


def is_ready(folder) -> bool:
    folder = epath.Path(folder)
    return folder.is_dir() and any((folder / f).exists() for f in READY_FILES)


def run_tokenizer_dir(workdir, build: Callable[[str], None], *, wait_s: float = 600.0) -> str:
    """WORKDIR/tokenizer, made by `build(tmp_folder)` on process 0 when absent; returns its path."""
    folder = epath.Path(workdir) / TOKENIZER_DIR
    if is_ready(folder):
        return os.fspath(folder)
    if parallel.is_main_process():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=os.fspath(folder.parent))
        try:
            build(tmp)
            os.replace(tmp, os.fspath(folder))
        except OSError:
            if not is_ready(folder):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return os.fspath(folder)
    deadline = time.time() + wait_s
    while not is_ready(folder):
        if time.time() > deadline:
            raise TimeoutError(f"{folder}: process 0 did not write the run's tokenizer within {wait_s:.0f} s")
        time.sleep(0.5)
    return os.fspath(folder)


def copier(source) -> Callable[[str], None]:
    """build function: copies the tokenizer folder `source`."""
    def build(tmp: str) -> None:
        if not is_ready(source):
            raise FileNotFoundError(f"{source}: no tokenizer there (no {' / '.join(READY_FILES)})")
        shutil.copytree(os.fspath(source), tmp, dirs_exist_ok=True)
    return build
