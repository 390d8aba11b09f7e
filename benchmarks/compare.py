"""Compare two benchmark runs: `jaxboost bench compare BASE.json NEW.json [--threshold 0.1] [--plot PNG]`
(also `python -m benchmarks.compare`).

Prints a markdown table of every (case, impl) row of either run: seconds in each, the change, the
PyTorch time / JAX time ratio in each and the new MFU. Exits 1 naming each case whose JAX row got slower
than the base by more than `--threshold` (a fraction: 0.1 = 10%), and each case the new run recorded as
failed (a case fails when its correctness check against the reference raises, or when it crashes). Only
the JAX rows gate: the PyTorch rows are the yardstick, their drift is the machine's. A row present in one
run only is listed, not gated (the runs may have chosen different --cases, a precision or a device: case
names carry the last two). Every schema version up to harness.SCHEMA_VERSION is read (benchmarks/schema.md;
rows of files before version 3 read as float32 on a CPU).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from benchmarks.harness import SCHEMA_VERSION, Row

GATED_IMPLS = ("jax",)


def load_results(path: str) -> dict:
    """results.json -> {"rows": [Row], "failed": {case: error}, "commit": str | None}; a missing or
    malformed file is one ValueError naming it."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such results file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a results.json ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise ValueError(f"{path}: not a results.json (no 'rows' list)")
    version = doc.get("schema_version", 1)  # version 1 (before the schema was written down) had none
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {version!r} is newer than this reader ({SCHEMA_VERSION})")
    try:
        rows = [Row.from_json(r) for r in doc["rows"]]
    except TypeError as e:
        raise ValueError(f"{path}: a row lacks a field ({e})") from None
    cases = doc.get("cases", {})
    failed = {name: cases.get(name, {}).get("error", "failed") for name in doc.get("failed", [])}
    machine = doc.get("machine") if isinstance(doc.get("machine"), dict) else {}
    return {"rows": rows, "failed": failed, "commit": (doc.get("git") or {}).get("commit"),
            "cpu": machine.get("cpu_id") or machine.get("cpu")}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if _finite(x) else ""


def compare(base: dict, new: dict, threshold: float) -> tuple[str, list[str]]:
    """-> (markdown table, problems). A problem names a case that got slower or failed."""
    base_rows = {(r.case, r.impl): r for r in base["rows"]}
    new_rows = {(r.case, r.impl): r for r in new["rows"]}
    keys = list(new_rows) + [k for k in base_rows if k not in new_rows]
    lines = ["| case | impl | base s | new s | change | torch/jax base | torch/jax new | MFU new | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for key in keys:
        b, n = base_rows.get(key), new_rows.get(key)
        change = n.seconds / b.seconds - 1 if b and n and _finite(b.seconds) and _finite(n.seconds) and b.seconds > 0 \
            else None
        verdict = "only in base" if n is None else "only in new" if b is None else ""
        if change is not None and key[1] in GATED_IMPLS and change > threshold:
            verdict = f"SLOWER (> {100 * threshold:.0f}%)"
            problems.append(f"{key[0]} ({key[1]}): {b.seconds:.4g} s -> {n.seconds:.4g} s ({100 * change:+.1f}%)")
        lines.append(f"| {key[0]} | {key[1]} | {_fmt(b and b.seconds, '.4f')} | {_fmt(n and n.seconds, '.4f')} | "
                     f"{_fmt(change and 100 * change, '+.1f', '%') if change is not None else ''} | "
                     f"{_fmt(b and b.ratio_vs_jax, '.2f', 'x') if key[1] != 'jax' else ''} | "
                     f"{_fmt(n and n.ratio_vs_jax, '.2f', 'x') if key[1] != 'jax' else ''} | "
                     f"{_fmt(n and n.mfu and 100 * n.mfu, '.1f', '%')} | {verdict} |")
    for name, error in new["failed"].items():
        problems.append(f"case {name} failed: {error}")
    return "\n".join(lines), problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="results.json of the baseline run")
    parser.add_argument("new", help="results.json of the run to check")
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="fail when a JAX row is slower than the base by more than this fraction (0.1 = 10%%)")
    parser.add_argument("--plot", default=None, help="also write a PNG of both runs' torch/jax ratios here")


def main(args) -> int:
    if not (_finite(args.threshold) and args.threshold >= 0):
        raise ValueError(f"--threshold must be a non-negative number, got {args.threshold}")
    base, new = load_results(args.base), load_results(args.new)
    table, problems = compare(base, new, args.threshold)
    print(f"base {args.base} (commit {str(base['commit'])[:10]}) vs new {args.new} "
          f"(commit {str(new['commit'])[:10]}); threshold {100 * args.threshold:.0f}%\n")
    print(table)
    if base["cpu"] and new["cpu"] and base["cpu"] != new["cpu"]:
        # not gated on: a CI runner may change under a job; the ratios against torch, measured in the same
        # run, are what compares across machines
        print(f"\nnote: the runs come from different CPUs (base {base['cpu']}; new {new['cpu']}): their times "
              f"differ by the machine as well as the code; the torch/jax ratios compare across machines")
    if args.plot:
        from benchmarks import harness
        harness.plot_ratios(args.plot, new["rows"], title="PyTorch time / JAX time: this run vs baseline",
                            base_rows=base["rows"])
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("\nno JAX row slower than the threshold, no failed case")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except (ValueError, FileNotFoundError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        sys.exit(2)
