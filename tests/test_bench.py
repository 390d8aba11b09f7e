"""The benchmark runner, its results.json and `jaxboost bench compare`: FLOPs of loops, results kept when
a case fails or the process dies, regressions and failed cases named, bad files refused in one line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import harness, run
from benchmarks.harness import Row
from jaxboost import cli


def test_xla_flops_counts_every_trip_of_a_fori_loop():
    n, trips = 64, 25
    a = jnp.ones((n, n), jnp.float32)
    loop = jax.jit(lambda a: jax.lax.fori_loop(0, trips, lambda i, x: x @ a, a))
    one = 2 * n ** 3  # one [n, n] @ [n, n] matmul
    assert harness.xla_flops(loop, a) == pytest.approx(one, rel=1e-3)  # what XLA reports: the body once
    assert harness.xla_flops(loop, a, trip_count=trips) == pytest.approx(trips * one, rel=1e-3)
    with pytest.raises(ValueError, match="trip_count=24"):
        harness.xla_flops(loop, a, trip_count=24)


def test_xla_flops_refuses_a_step_that_closes_over_its_weights():
    weights = jnp.ones((2048, 2048), jnp.float32)  # 16 MiB + the 8-byte bias below: just over the limit
    bias = jnp.ones((2,), jnp.float32)
    x = jnp.ones((4, 2048), jnp.float32)
    closure = jax.jit(lambda x: x @ weights + bias[0])
    assert harness.closed_over_bytes(closure, x) == weights.nbytes + bias.nbytes
    with pytest.raises(ValueError, match="closes over 16 MiB"):
        harness.xla_flops(closure, x)
    as_arguments = jax.jit(lambda w, x: x @ w + 1.0)
    assert harness.closed_over_bytes(as_arguments, weights, x) == 0
    assert harness.xla_flops(as_arguments, weights, x) == pytest.approx(2 * 4 * 2048 * 2048, rel=0.01)


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v4", 275e12),
                                        ("TPU v6 lite", 918e12), ("cpu", None)])
def test_device_bf16_peak_reads_the_published_figure(kind, peak):
    assert harness.device_bf16_peak(kind) == peak


def _doc(rows, failed=(), version=harness.SCHEMA_VERSION):
    doc = {"rows": [r.__dict__ for r in rows], "failed": list(failed),
           "cases": {n: {"status": "failed", "error": "AssertionError: logits differ"} for n in failed},
           "git": {"commit": "abc"}}
    if version is not None:
        doc["schema_version"] = version
    return doc


def _write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


BASE = [Row("cris/train 96px b4", "jax", 0.050, 80.0, mfu=0.14), Row("cris/train 96px b4", "torch eager", 0.045, 88.0,
                                                                      ratio_vs_jax=0.9),
        Row("clipseg/infer 96px b4", "jax", 0.003, 1300.0)]


def test_compare_names_each_jax_row_slower_than_the_threshold(tmp_path, capsys):
    new = [Row("cris/train 96px b4", "jax", 0.060, 66.0, mfu=0.12),        # +20%: over 10%
           Row("cris/train 96px b4", "torch eager", 0.090, 44.0, ratio_vs_jax=1.5),  # torch got slower: not gated
           Row("clipseg/infer 96px b4", "jax", 0.00315, 1270.0)]           # +5%: within
    code = cli.main(["bench", "compare", _write(tmp_path, "base.json", _doc(BASE, version=None)),
                     _write(tmp_path, "new.json", _doc(new)), "--threshold", "0.1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "cris/train 96px b4 (jax): 0.05 s -> 0.06 s (+20.0%)" in err
    assert "clipseg" not in err and "torch eager" not in err
    assert "| cris/train 96px b4 | torch eager | 0.0450 | 0.0900 | +100.0% | 0.90x | 1.50x |" in out
    assert cli.main(["bench", "compare", _write(tmp_path, "b.json", _doc(BASE)), _write(tmp_path, "n.json", _doc(new)),
                     "--threshold", "0.25"]) == 0


def test_compare_fails_on_a_failed_case_and_lists_one_sided_rows(tmp_path, capsys):
    new = [Row("clipseg/infer 96px b4", "jax", 0.003, 1300.0), Row("sdm/train 32px b4", "jax", 0.3, 13.0)]
    code = cli.main(["bench", "compare", _write(tmp_path, "base.json", _doc(BASE)),
                     _write(tmp_path, "new.json", _doc(new, failed=["cris"]))])
    out, err = capsys.readouterr()
    assert code == 1
    assert "case cris failed: AssertionError: logits differ" in err
    assert "| sdm/train 32px b4 | jax |  | 0.3000 |  |  |  |  | only in new |" in out
    assert "| cris/train 96px b4 | jax | 0.0500 |  |  |  |  |  | only in base |" in out


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
"""


def test_machine_names_the_cpu_beyond_its_model_name_and_compare_notes_a_change(tmp_path, capsys):
    ident = harness.cpu_identity(CPUINFO)
    assert ident == {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 17 (avx2+fma+avx512f+avx512_bf16)"}
    base, new = _doc(BASE), _doc(BASE)
    base["machine"] = {"cpu": "AMD EPYC", "cpu_id": "AuthenticAMD family 25 model 1 (avx2+fma)"}
    new["machine"] = ident
    assert cli.main(["bench", "compare", _write(tmp_path, "b.json", base), _write(tmp_path, "n.json", new)]) == 0
    out = capsys.readouterr().out
    assert "different CPUs (base AuthenticAMD family 25 model 1 (avx2+fma); new AuthenticAMD family 25 model 17" in out
    assert cli.main(["bench", "compare", _write(tmp_path, "b2.json", new), _write(tmp_path, "n2.json", new)]) == 0
    assert "different CPUs" not in capsys.readouterr().out


def test_compare_refuses_a_bad_file_in_one_line(tmp_path, capsys):
    good = _write(tmp_path, "good.json", _doc(BASE))
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": [')
    assert cli.main(["bench", "compare", good, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.json: not a results.json" in err
    assert cli.main(["bench", "compare", str(tmp_path / "absent.json"), good]) == 2
    assert "absent.json: no such results file" in capsys.readouterr().err
    assert cli.main(["bench", "compare", good, _write(tmp_path, "v9.json", _doc(BASE, version=99))]) == 2
    assert "schema_version 99" in capsys.readouterr().err


def test_plot_ratios_writes_a_png_with_the_baseline(tmp_path):
    path = tmp_path / "ratios.png"
    assert harness.plot_ratios(path, BASE, base_rows=BASE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not harness.plot_ratios(tmp_path / "none.png", [BASE[0]])  # no torch row: nothing to draw


FAKE_CASES = {
    "ok": 'from benchmarks.harness import Row\n\ndef run(quick=False):\n'
          '    return [Row("fake/step", "jax", 0.5, 2.0), Row("fake/step", "torch eager", 1.0, 1.0)]\n',
    "wrong": 'def run(quick=False):\n    raise AssertionError("outputs differ by 0.3")\n',
    # as the kernel's OOM killer would: no exception, no clean-up
    "dies": 'import os\n\ndef run(quick=False):\n    os._exit(137)\n',
}


@pytest.fixture
def fake_cases(tmp_path, monkeypatch):
    """A package `fakebench` of cases, run by dotted module path."""
    package = tmp_path / "fakebench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in FAKE_CASES.items():
        (package / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def _args(out, cases, case_timeout=0.0):
    return type("Args", (), {"quick": True, "out": str(out), "cases": cases, "case_timeout": case_timeout})


def test_runner_records_a_failed_case_and_keeps_the_others(fake_cases):
    out = fake_cases / "out"
    assert run.main(_args(out, "fakebench.wrong,fakebench.ok")) == 1
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema_version"] == harness.SCHEMA_VERSION and doc["failed"] == ["fakebench.wrong"]
    assert doc["cases"]["fakebench.wrong"]["error"] == "AssertionError: outputs differ by 0.3"
    assert doc["cases"]["fakebench.ok"]["status"] == "ok"
    assert [(r["case"], r["impl"], r["group"]) for r in doc["rows"]] == [("fake/step", "jax", "fakebench.ok"),
                                                                       ("fake/step", "torch eager", "fakebench.ok")]
    assert doc["rows"][1]["ratio_vs_jax"] == pytest.approx(2.0)
    assert set(doc["machine"]) >= {"cpu", "cpu_count", "jax", "jaxlib", "python"} and "commit" in doc["git"]
    assert (out / "speed.png").exists()


def test_results_survive_a_process_killed_in_a_later_case(fake_cases):
    out = fake_cases / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out),
                           "--cases", "fakebench.ok,fakebench.dies"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_cases), os.getcwd()])})
    assert proc.returncode == 137
    doc = json.loads((out / "results.json").read_text())
    assert [r["case"] for r in doc["rows"]] == ["fake/step", "fake/step"]
    assert doc["cases"]["fakebench.dies"]["status"] == "running"  # what it was doing when it died
    assert np.isclose(doc["rows"][0]["seconds"], 0.5)


def test_case_timeout_runs_each_case_apart_so_a_killed_one_is_named(fake_cases):
    out = fake_cases / "out"
    assert run.main(_args(out, "fakebench.dies,fakebench.ok", case_timeout=120)) == 1
    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"] == ["fakebench.dies"]
    assert doc["cases"]["fakebench.dies"]["error"] == "exited with status 137"
    assert [r["group"] for r in doc["rows"]] == ["fakebench.ok", "fakebench.ok"]


def test_runner_refuses_an_unknown_case_by_name():
    with pytest.raises(SystemExit, match="unknown case 'clipsge'"):
        run.main(_args("unused", "clipsge"))


def _curve(dice, walls, steps_per_epoch=10):
    return [{"step": (i + 1) * steps_per_epoch, "wall_s": w, "val/dice_mean": d} for i, (d, w) in enumerate(zip(dice, walls))]


def test_time_to_dice_reads_both_curves_at_one_target():
    from benchmarks import time_to_dice
    runs = {"jax": {"real": _curve([10, 30, 50], [1, 2, 3]), "pretrain_finetune": _curve([45, 52], [1.5, 2.5])},
            "torch eager": {"real": _curve([10, 20, 40, 45], [3, 6, 9, 12])},
            "steps_per_epoch": {"real": 10, "pretrain_finetune": 10}, "batch_size": 8,
            "initial_dice": {"jax": 5.0, "torch eager": 5.0}}
    rows, summary = time_to_dice._rows("clipseg", runs)
    harness.add_ratios(rows)
    # target 0.99 x min(50, 45) = 44.55 (Synthetic Boost's level of the lower best): jax at epoch 3 (3 s),
    # torch at epoch 4 (12 s)
    assert summary["target_dice"] == pytest.approx(44.55)
    assert [(r.impl, r.seconds) for r in rows] == [("jax", 3), ("torch eager", 12)]
    assert [r.compile_s for r in rows] == [None, None]   # curves without the loop's compile clock
    assert rows[1].ratio_vs_jax == pytest.approx(4.0)
    assert rows[0].items_per_s == pytest.approx(3 * 10 * 8 / 3)
    # jaxboost's convergence speed-up: 99% of the real-only best (49.5) after 3 real epochs, 2 finetune epochs
    conv = summary["jax"]["synthetic_speedup"]
    assert conv["speedup_epochs"] == pytest.approx(1.5) and conv["speedup_wall"] == pytest.approx(3 / 2.5)
    assert "synthetic_speedup" not in summary["torch eager"]


def test_time_to_dice_reports_jaxboosts_compile_seconds_at_the_target():
    from benchmarks import time_to_dice
    jax_real = [dict(e, compile_s=c) for e, c in zip(_curve([10, 30, 50], [4, 5, 6]), [2.5, 2.75, 2.75])]
    runs = {"jax": {"real": jax_real}, "torch eager": {"real": _curve([10, 20, 40, 45], [3, 6, 9, 12])},
            "steps_per_epoch": {"real": 10}, "batch_size": 8, "initial_dice": {"jax": 5.0, "torch eager": 5.0}}
    rows, summary = time_to_dice._rows("clipseg", runs)
    assert [(r.impl, r.seconds, r.compile_s) for r in rows] == [("jax", 6, 2.75), ("torch eager", 12, None)]
    assert summary["jax"]["compile_to_target_s"] == 2.75 and "2.8 s of it compiling" in rows[0].note
    assert "| 6.0 | 2.8 |" in time_to_dice._table({"clipseg": summary})


def test_time_to_dice_is_nan_when_validation_dice_never_rises():
    from benchmarks import time_to_dice
    flat = {"real": _curve([14.0, 13.5, 12.5], [1, 2, 3])}
    runs = {"jax": flat, "torch eager": flat, "steps_per_epoch": {"real": 10}, "batch_size": 8,
            "initial_dice": {"jax": 14.4, "torch eager": 14.4}}
    rows, _ = time_to_dice._rows("clipseg", runs)
    assert all(np.isnan(r.seconds) for r in rows)


def _both_regimes():
    real = {"jax": _curve([10, 30, 50, 50], [1, 2, 3, 4]), "torch eager": _curve([10, 20, 40, 45], [3, 6, 9, 12])}
    finetune = {"jax": _curve([45, 50, 51, 51], [1, 2, 3, 4]), "torch eager": _curve([20, 30, 35, 40], [3, 6, 9, 12])}
    return {**{impl: {"real": real[impl], "pretrain_finetune": finetune[impl]} for impl in real},
            "steps_per_epoch": {"real": 10, "pretrain_finetune": 10}, "batch_size": 8,
            "initial_dice": {"jax": 5.0, "torch eager": 5.0}, "stages": {"jax real": {"wall_s": 4.0, "cpu_s": 6.0}}}


def test_time_to_dice_case_runs_through_the_runner_and_compare(tmp_path, monkeypatch, capsys):
    """The case's plumbing without training: canned curves in, rows, the table with both frameworks'
    synthetic-pretraining speed-ups beside the paper's, results.json and `bench compare` out."""
    from benchmarks import time_to_dice
    from jaxboost import parallel
    monkeypatch.setattr(parallel, "setup_compilation_cache", lambda path: None)
    monkeypatch.setattr(time_to_dice, "_data", lambda root, plan, synthetic: {"stages": {"data": {"wall_s": 1.0}}})
    monkeypatch.setattr(time_to_dice, "_model_runs", lambda name, data, plan, root: _both_regimes())
    out = tmp_path / "bench"
    assert run.main(_args(out, "time_to_dice")) == 0
    doc = json.loads((out / "results.json").read_text())
    assert [(r["case"], r["impl"]) for r in doc["rows"]] == [
        (f"time_to_dice/{m}", impl) for m in ("clipseg", "cris") for impl in ("jax", "torch eager")]
    # target 0.99 x min(50, 45) = 44.55: jax at epoch 3 (3 s), torch at epoch 4 (12 s)
    assert [r["seconds"] for r in doc["rows"][:2]] == [3, 12] and doc["rows"][1]["ratio_vs_jax"] == pytest.approx(4)
    extra = doc["extra"]["time_to_dice"]
    assert extra["plan"]["synthetic"] == "phantom_render" and extra["plan"]["per_mask"] == 5
    table = extra["table"].splitlines()
    # jax: 99% of its own best (49.5) at real epoch 3, finetune epoch 2 -> 1.50x; torch: 44.55 never reached
    # by its finetune (best 40)
    # (its curves here carry no compile clock: the "of which compiling" cell is empty)
    assert "| clipseg | jax | 5.0 -> 50.0 | 3 (target 44.5) | 3.0 |  | 4.0 | 1.50x / 1.50x (real 3 ep, finetune 2 ep" \
        in table[2] and table[2].endswith("| 1.71x |")
    assert "not reached (real 4 ep to 44.5; finetune best 40.0)" in table[3] and table[5].endswith("| 4.55x |")
    base = tmp_path / "base.json"
    base.write_text((out / "results.json").read_text())
    assert cli.main(["bench", "compare", str(base), str(out / "results.json")]) == 0
    assert "time_to_dice/cris" in capsys.readouterr().out


def test_time_to_dice_render_draws_its_mask_into_the_sector():
    """The --quick synthetic stand-in: the phantom's image model on a mask, blood dark, myocardium bright,
    nothing outside the sector, the same image from the same rng."""
    from benchmarks import time_to_dice
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 20:44], mask[30:34, 20:44], mask[34:50, 24:40] = 1, 2, 3
    cone = np.zeros_like(mask)
    cone[2:62, 4:60] = 1
    image = time_to_dice._echo_from_mask(mask, cone, "Good", np.random.default_rng(0))
    assert image.shape == (time_to_dice.RENDER_SIZE,) * 2 and image.dtype == np.uint8
    up = lambda m: np.kron(m, np.ones((4, 4), np.uint8)).astype(bool)  # noqa: E731
    inner = lambda m: up(m) & ~np.roll(up(m), 8, 0) | up(m) & ~np.roll(up(m), -8, 0)  # noqa: E731
    lv, myo = image[up(mask == 1) & ~inner(mask == 1)], image[up(mask == 2)]
    assert lv.mean() < 0.5 * myo.mean() and not image[~up(cone)].any()
    again = time_to_dice._echo_from_mask(mask, cone, "Good", np.random.default_rng(0))
    np.testing.assert_array_equal(image, again)


def test_convergence_case_reads_the_demo_report(tmp_path, monkeypatch):
    """The multi-seed convergence case runs `jaxboost demo` (one CLIPSeg seed with --quick) and tabulates its
    report.json beside the paper."""
    from benchmarks import convergence
    from jaxboost import demo
    spread = lambda mean, n=1: {"mean": mean, "sd": 0.0, "n": n}  # noqa: E731
    summary = {"speedup_epochs": spread(1.5), "speedup_wall": spread(1.2), "faster_in": 1, "wins_in": 1, "seeds": 1,
               "convergence": {"0": {}}, "test": {r: {"mean": spread(40.0 + i)} for i, r in enumerate(demo.REGIMES)}}
    seen = {}

    def fake_main(args):
        seen.update(seeds=args.seeds, models=args.models)
        (tmp_path / "report").mkdir()
        (tmp_path / "report" / "report.json").write_text(json.dumps({"timings": {}, "models": {"clipseg": summary}}))
    monkeypatch.setattr(demo, "main", fake_main)
    rows, extra = convergence.run(quick=True, out=str(tmp_path))
    assert rows == [] and seen == {"seeds": 1, "models": "clipseg"}
    assert extra["table"].splitlines()[2] == ("| clipseg | 1 of 1 | 1.50 ± 0.00 (reached in 1) | 1.20 ± 0.00 | 1.71x | "
                                              "40.0 ± 0.0 / 41.0 ± 0.0 / 42.0 ± 0.0 |")
