"""One command for every benchmark: `python -m benchmarks.run [--quick] [--out DIR] [--cases a,b]`
(also `jaxboost bench`). Prints one table, writes results.json / results.md / speed.png under --out.

Cases are modules `benchmarks.<name>` with `run(quick: bool) -> list[Row] | (list[Row], dict)`.
A case that raises is reported and makes the command exit non-zero (a wrong result fails CI); slowness
never does.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback

CASES = {
    "clipseg": "benchmarks.speed_clipseg",
    "cris": "benchmarks.speed_cris",
    "sdm": "benchmarks.speed_sdm",
    "mumc": "benchmarks.speed_mumc",
    "scaling": "benchmarks.scaling",
    "fidelity": "benchmarks.sdm_fidelity",
    "vqa_gain": "benchmarks.vqa_pretrain_gain",
    "convergence": "benchmarks.convergence",
    "input": "benchmarks.input_bench",
}


# --quick runs the speed cases (a few minutes on 2 cores, what CI runs); the training-based cases
# (scaling, convergence, fidelity, vqa_gain) take tens of minutes and run when named or without --quick.
QUICK_CASES = "clipseg,cris,mumc,sdm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes on 2 CPU cores")
    parser.add_argument("--out", default="bench_out", help="output folder")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated subset of {list(CASES)} (default: all; with --quick: {QUICK_CASES})")


def main(args) -> int:
    from benchmarks import harness
    rows, extra, failed = [], {}, []
    cases = args.cases or (QUICK_CASES if args.quick else ",".join(CASES))
    for name in [c for c in cases.split(",") if c]:
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; known: {list(CASES)}")
        t = time.time()
        print(f"[bench] {name} ...", flush=True)
        try:
            out = importlib.import_module(CASES[name]).run(quick=args.quick)
        except ModuleNotFoundError as e:
            if e.name == CASES[name]:
                print(f"[bench] {name}: not available ({e.name} missing)", flush=True)
                continue
            failed.append(name)
            traceback.print_exc()
            continue
        except Exception:  # noqa: BLE001 — report every failing case, then fail the run
            failed.append(name)
            traceback.print_exc()
            continue
        case_rows, case_extra = out if isinstance(out, tuple) else (out, {})
        rows += case_rows
        if case_extra:
            extra[name] = case_extra
        print(f"[bench] {name} done in {time.time() - t:.0f}s", flush=True)
    harness.add_ratios(rows)
    result = harness.write_results(args.out, rows, {"extra": extra, "failed": failed, "quick": args.quick})
    print(harness.format_table(rows))
    for name, e in extra.items():
        if "table" in e:
            print(f"\n{name}:\n{e['table']}")
    print(f"\nmachine: {result['machine'].get('cpu')} ({result['machine']['cpu_count']} cores), "
          f"jax {result['machine'].get('jax')} on {result['machine']['jax_backend']}, "
          f"torch {result['machine'].get('torch')}; wrote {os.path.abspath(args.out)}/results.json")
    if failed:
        print(f"FAILED cases: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
