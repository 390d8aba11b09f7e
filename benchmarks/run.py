"""One command for every benchmark: `python -m benchmarks.run [--quick] [--out DIR] [--cases a,b]`
(also `jaxboost bench`; `jaxboost bench compare BASE.json NEW.json` compares two runs). Prints one table,
writes results.json (benchmarks/schema.md) / results.md / speed.png under --out.

Cases are modules `benchmarks.<name>` with `run(quick: bool) -> list[Row] | (list[Row], dict)`.
results.json is rewritten after every case, so a run killed midway (out of memory, a CI timeout) keeps
every case measured before it. A case that raises is recorded as failed and the others still run; a failed
case makes the command exit non-zero (a wrong result fails CI); slowness never does here (compare does).
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
    "time_to_dice": "benchmarks.time_to_dice",
}


# --quick runs the speed cases (a few minutes on 2 cores, what CI runs); the training-based cases
# (scaling, convergence, fidelity, vqa_gain, time_to_dice) take tens of minutes and run when named or
# without --quick (time_to_dice --quick: a few minutes).
QUICK_CASES = "clipseg,cris,mumc,sdm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes on 2 CPU cores")
    parser.add_argument("--out", default="bench_out", help="output folder")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated subset of {list(CASES)} (default: all; with --quick: {QUICK_CASES})")


def _run_case(name: str, quick: bool) -> tuple[list, dict, dict]:
    """-> (rows, extra, status entry) of one case; an exception is caught and recorded, never raised."""
    t = time.time()
    print(f"[bench] {name} ...", flush=True)
    try:
        out = importlib.import_module(CASES[name]).run(quick=quick)
    except ModuleNotFoundError as e:
        if e.name == CASES[name]:
            print(f"[bench] {name}: not available ({e.name} missing)", flush=True)
            return [], {}, {"status": "unavailable", "seconds": 0.0, "error": f"{e.name} missing"}
        traceback.print_exc()
        return [], {}, {"status": "failed", "seconds": time.time() - t, "error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001 — record every failing case, run the others, then fail the run
        traceback.print_exc()
        return [], {}, {"status": "failed", "seconds": time.time() - t,
                        "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    rows, extra = out if isinstance(out, tuple) else (out, {})
    print(f"[bench] {name} done in {time.time() - t:.0f}s", flush=True)
    return rows, extra, {"status": "ok", "seconds": time.time() - t}


def main(args) -> int:
    from benchmarks import harness
    names = [c for c in (args.cases or (QUICK_CASES if args.quick else ",".join(CASES))).split(",") if c]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"--cases: unknown case(s) {unknown}; known: {list(CASES)}")
    rows, extra, cases = [], {}, {n: {"status": "pending"} for n in names}
    fields = dict(quick=bool(args.quick), argv=sys.argv[1:])
    write = lambda plot: harness.write_results(
        args.out, harness.results_document(harness.add_ratios(rows), cases, extra=extra, **fields), plot)
    for name in names:
        cases[name] = {"status": "running"}
        write(False)  # before and after every case: a run killed midway keeps what it measured and says where
        case_rows, case_extra, cases[name] = _run_case(name, args.quick)
        for r in case_rows:
            r.group = name
        rows += case_rows
        if case_extra:
            extra[name] = case_extra
        write(False)
    document = write(True)
    print(harness.format_table(rows))
    for name, e in extra.items():
        if "table" in e:
            print(f"\n{name}:\n{e['table']}")
    m = document["machine"]
    print(f"\nmachine: {m.get('cpu')} ({m['cpu_count']} cores), jax {m.get('jax')} on {m['jax_backend']}, "
          f"torch {m.get('torch')}; commit {str(document['git']['commit'])[:10]}; "
          f"wrote {os.path.abspath(args.out)}/results.json")
    if document["failed"]:
        print(f"FAILED cases: {document['failed']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
