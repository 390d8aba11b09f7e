"""One command for every benchmark: `python -m benchmarks.run [--quick] [--out DIR] [--cases a,b]
[--device auto|cpu|gpu] [--dtype float32|bfloat16]` (also `jaxboost bench`; `jaxboost bench compare
BASE.json NEW.json` compares two runs). Prints one table,
writes results.json (benchmarks/schema.md) / results.md / speed.png under --out.

Cases are modules `benchmarks.<name>` with `run(quick: bool) -> list[Row] | (list[Row], dict)`. --device and
--dtype are exported as BENCH_DEVICE / BENCH_DTYPE, which the speed cases read (`harness.setting()`), also
in the child processes of --case-timeout.
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
from pathlib import Path

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
    "synth_host": "benchmarks.synth_host",
    "corpus_scale": "benchmarks.corpus_scale",
    "input": "benchmarks.input_bench",
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
    parser.add_argument("--case-timeout", type=case_timeouts, default={},
                        help="run each case in its own process, stopped after this many seconds (0: all in this "
                             "process), or per case: 'clipseg=90,sdm=200' (cases not named run in this process); a "
                             "case killed for memory or time is then recorded, the others still run")
    parser.add_argument("--device", choices=harness_devices(), default=None,
                        help="where the speed cases run both frameworks (default: $BENCH_DEVICE or auto: the GPU "
                             "when JAX has one)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="the speed cases' compute precision (default: $BENCH_DTYPE or float32); bfloat16: "
                             "mixed precision, float32 parameters (harness.Setting)")


def harness_devices() -> tuple[str, ...]:
    from benchmarks import harness
    return harness.DEVICES


def case_timeouts(text: str) -> dict:
    """'110' -> {"*": 110.0}; 'clipseg=90,sdm=200' -> {"clipseg": 90.0, "sdm": 200.0}."""
    try:
        if "=" not in text:
            return {"*": float(text)}
        return {name.strip(): float(sec) for name, sec in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--case-timeout: expected seconds or name=seconds,..., got {text!r}")


def case_module(name: str) -> str:
    """The module of a case: a name of CASES, or any dotted module path (a case kept outside this folder)."""
    if name in CASES or "." in name:
        return CASES.get(name, name)
    raise SystemExit(f"--cases: unknown case {name!r}; known: {list(CASES)} (or a dotted module path)")


def _run_case(name: str, quick: bool) -> tuple[list, dict, dict]:
    """-> (rows, extra, status entry) of one case; an exception is caught and recorded, never raised."""
    t = time.time()
    print(f"[bench] {name} ...", flush=True)
    try:
        out = importlib.import_module(case_module(name)).run(quick=quick)
    except ModuleNotFoundError as e:
        if e.name == case_module(name):
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
    return rows, extra, {"status": "ok", "seconds": time.time() - t, "load_avg_1min_after": os.getloadavg()[0]}


def _run_case_isolated(name: str, quick: bool, timeout: float) -> tuple[list, dict, dict]:
    """_run_case in a child process (`--cases name` into a temporary folder) with a wall-clock limit."""
    import json
    import subprocess
    import tempfile

    from benchmarks import harness
    from benchmarks.harness import Row
    t = time.time()
    with tempfile.TemporaryDirectory(prefix=f"bench_{name}_") as out:
        cmd = [sys.executable, "-m", "benchmarks.run", "--cases", name, "--out", out] + (["--quick"] if quick else [])
        try:
            root = str(Path(__file__).resolve().parent.parent)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
            rc = subprocess.run(cmd, timeout=timeout, env=env).returncode
            error = None if rc in (0, 1) else f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:.0f} s"
        try:
            doc = json.loads((Path(out) / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            doc = {"rows": [], "extra": {}, "cases": {}}
    harness._PEAK.update(doc.get("peak_matmul_flops_f32") or {})  # the peak the child's MFU used
    status = doc["cases"].get(name, {"status": "failed"})
    if error:  # rows it wrote before dying are kept; the case still counts as failed
        status = {**status, "status": "failed", "error": error}
    status["seconds"] = time.time() - t
    return [Row.from_json(r) for r in doc["rows"]], doc.get("extra", {}).get(name, {}), status


def export_setting(args) -> None:
    """--device / --dtype into the environment every case (and every case's process) reads."""
    from benchmarks import harness
    for flag, var in (("device", "BENCH_DEVICE"), ("dtype", "BENCH_DTYPE")):
        if getattr(args, flag, None):
            os.environ[var] = getattr(args, flag)
    try:
        harness.setting()
    except ValueError as e:
        raise SystemExit(f"benchmarks.run: {e}") from None


def main(args) -> int:
    from benchmarks import harness
    export_setting(args)
    names = [c for c in (args.cases or (QUICK_CASES if args.quick else ",".join(CASES))).split(",") if c]
    for name in names:
        case_module(name)
    rows, extra, cases = [], {}, {n: {"status": "pending"} for n in names}
    fields = dict(quick=bool(args.quick), argv=sys.argv[1:])
    write = lambda plot: harness.write_results(
        args.out, harness.results_document(harness.add_ratios(rows), cases, extra=extra, **fields), plot)
    for name in names:
        # the load average says whether a timing was taken on a quiet machine (a shared CPU skews torch most)
        cases[name] = {"status": "running", "load_avg_1min_before": os.getloadavg()[0]}
        write(False)  # before and after every case: a run killed midway keeps what it measured and says where
        timeouts = getattr(args, "case_timeout", {}) or {}
        timeout = timeouts.get(name, timeouts.get("*", 0.0)) if isinstance(timeouts, dict) else timeouts
        case_rows, case_extra, status = (_run_case_isolated(name, args.quick, timeout) if timeout > 0
                                         else _run_case(name, args.quick))
        cases[name].update(status)
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
    cpu = f"{m.get('cpu')}, {m['cpu_id']}" if m.get("cpu_id") else m.get("cpu")
    print(f"\nmachine: {cpu} ({m['cpu_count']} cores), jax {m.get('jax')} on {m['jax_backend']}, "
          f"torch {m.get('torch')}; speed cases on {document['device']} in {document['dtype']}; "
          f"commit {str(document['git']['commit'])[:10]}; "
          f"wrote {os.path.abspath(args.out)}/results.json")
    if document["failed"]:
        print(f"FAILED cases: {document['failed']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    add_arguments(p)
    sys.exit(main(p.parse_args()))
