"""The speed cases' device and dtype: the Setting read from the runner's flags, case names and MFU peaks per
dtype, cuDNN attention asked for in bf16 on a (pretended) GPU, torch references that make every tensor on
their inputs' device (checked on a CPU by making the default device `meta`), SDPA parity, old results.json
still read, and `device_check.sh --dry-run` end to end in bf16."""
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import compare, harness, run
from benchmarks.harness import Row, Setting


def test_setting_reads_the_environment_and_names_rows():
    assert harness.setting({}) == Setting("cpu", "float32")  # auto on a CPU backend
    assert harness.setting({"BENCH_DTYPE": "bf16", "BENCH_DEVICE": "cpu"}) == Setting("cpu", "bfloat16")
    assert Setting().tag == "" and Setting("cpu", "bfloat16").tag == " bf16"
    assert Setting("gpu", "bfloat16").tag == " bf16 gpu" and Setting("gpu", "float32").tag == " gpu"
    assert Setting("gpu", "float32").torch_device == "cuda" and Setting("gpu", "float32").torch_sdpa
    assert not Setting().torch_sdpa  # the float32 CPU rows keep the attention they were measured with
    assert harness.resolve_device("auto", backend="gpu") == "gpu"
    assert harness.resolve_device("cuda", backend="gpu") == "gpu"
    with pytest.raises(ValueError, match="device gpu: JAX's backend is 'cpu'"):
        harness.setting({"BENCH_DEVICE": "gpu"})
    with pytest.raises(ValueError, match="BENCH_DTYPE='fp8'"):
        harness.setting({"BENCH_DTYPE": "fp8"})
    rows = Setting("cpu", "bfloat16").label([Row("x", "jax", 1.0, 1.0)])
    assert (rows[0].device, rows[0].dtype) == ("cpu", "bfloat16")


def test_checks_use_the_dtype_tolerance_and_say_which_dtype():
    assert Setting().check("logits", 5e-5) == "float32 rel. err 5.0e-05 (tol 0.0001)"
    with pytest.raises(AssertionError, match="logits: JAX vs torch differ by 0.001 in float32"):
        Setting().check("logits", 1e-3)
    assert Setting("cpu", "bfloat16").check("logits", 1e-2).startswith("bfloat16 rel. err 1.0e-02")
    with pytest.raises(AssertionError, match="in bfloat16"):
        Setting("cpu", "bfloat16").check("logits", float("nan"))


def test_mfu_divides_by_the_bf16_peak_only_for_bf16_on_an_accelerator(monkeypatch):
    monkeypatch.setitem(harness._PEAK, "gpu:float32", 50e12)
    monkeypatch.setattr(harness.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(harness.jax, "devices", lambda: [types.SimpleNamespace(device_kind="NVIDIA H200")])
    assert harness.reference_peak("bfloat16") == (989e12, "published bf16 peak of NVIDIA H200")
    assert harness.reference_peak("float32") == (50e12, "measured f32 matmul rate (gpu)")
    monkeypatch.setattr(harness.jax, "default_backend", lambda: "cpu")
    monkeypatch.setitem(harness._PEAK, "cpu:float32", 0.2e12)
    assert harness.reference_peak("bfloat16") == (0.2e12, "measured f32 matmul rate (cpu)")


def test_case_timeouts_parse_one_limit_or_one_per_case():
    assert run.case_timeouts("110") == {"*": 110.0}
    assert run.case_timeouts("clipseg=65,sdm=245") == {"clipseg": 65.0, "sdm": 245.0}
    with pytest.raises(Exception, match="name=seconds"):
        run.case_timeouts("clipseg=fast")


def test_compare_reads_a_schema_2_file_as_float32_cpu(tmp_path):
    row = {"case": "cris/train 96px b4", "impl": "jax", "seconds": 0.05, "items_per_s": 80.0, "group": "cris"}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps({"schema_version": 2, "rows": [row], "failed": [], "cases": {}}))
    got = compare.load_results(str(path))["rows"][0]
    assert (got.case, got.device, got.dtype) == ("cris/train 96px b4", "cpu", "float32")
    doc = harness.results_document([got], {})
    assert doc["schema_version"] == 3 and (doc["device"], doc["dtype"]) == ("cpu", "float32")


def test_bf16_on_a_gpu_asks_for_cudnn_attention(monkeypatch):
    """What cannot run here (cuDNN itself) is selected: the MUMC model as the benchmark builds it (attention
    "auto", bf16; its ViT and BERT blocks attend through layers.dot_product_attention, as CLIPSeg's and
    CRIS's do) calls the cuDNN entry on a pretended GPU, and the SDM's fields ask for "cudnn"."""
    from benchmarks import speed_sdm
    from jaxboost.models import layers, mumc
    monkeypatch.setattr(layers, "current_backend", lambda: "gpu")
    asked = []
    monkeypatch.setitem(layers.ATTENTION._table, "cudnn", lambda q, k, v, mask=None, bias=None:
                        asked.append(q.dtype) or layers.einsum_attention(q, k, v, mask, bias))
    model = mumc.Model(image_size=32, patch_size=16, vision_width=32, vision_depth=1, vision_heads=2,
                       vision_mlp_dim=64, vocab_size=50, text_width=32, text_depth=2, text_heads=2, text_mlp_dim=64,
                       fusion_layer=1, max_position=16, embed_dim=16, dropout_rate=0.0, dtype=jnp.bfloat16,
                       attention_impl="auto")
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 8), jnp.int32),
                   jnp.ones((1, 8), jnp.int32))
    assert asked and set(asked) == {jnp.dtype(jnp.bfloat16)}
    assert speed_sdm._fields(True, Setting("gpu", "bfloat16"))[0]["attention_implementation"] == "cudnn"
    assert speed_sdm._fields(True, Setting("gpu", "float32"))[0]["attention_implementation"] is None
    assert speed_sdm._fields(True, Setting("cpu", "bfloat16"))[0]["attention_implementation"] is None


def _sdm_reference(sdpa):
    from benchmarks import speed_sdm
    from benchmarks.torch_ref.sdm_unet import unet_from_config
    from ml_collections import ConfigDict
    torch.manual_seed(0)
    fields = speed_sdm._fields(True, Setting())[0]
    ref = harness.torch_attention(unet_from_config(ConfigDict(fields)), sdpa).eval()
    for p in ref.parameters():
        if p.abs().sum() == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    return ref, fields


def _cris_reference(sdpa):
    from benchmarks import speed_cris
    from benchmarks.torch_ref import cris
    torch.manual_seed(0)
    clip_kw, head_kw, _, size, batch, seq = speed_cris._configs(True)
    model = harness.torch_attention(cris.CRIS(clip_kw, dropout=0.0, **head_kw), sdpa).eval()
    ids = torch.randint(1, 500, (1, seq))
    return model, (torch.randn(1, 3, 64, 64), ids, torch.ones_like(ids))


def test_torch_references_make_tensors_on_their_inputs_device_and_sdpa_keeps_parity():
    """With the default device `meta`, a tensor a reference makes without its inputs' device meets them in an
    op and raises: what would be a CPU tensor meeting CUDA ones on a GPU. SDPA gives the same outputs."""
    from benchmarks import speed_mumc
    from benchmarks.torch_ref.sdm_unet import GaussianDiffusion
    from jaxboost.diffusion import schedules
    cris_eager, inputs = _cris_reference(False)
    cris_sdpa, _ = _cris_reference(True)
    sdm_eager, fields = _sdm_reference(False)
    sdm_sdpa, _ = _sdm_reference(True)
    x = torch.randn(1, 1, 32, 32)
    labels = torch.nn.functional.one_hot(torch.randint(0, 5, (1, 32, 32)), 5).permute(0, 3, 1, 2).float()
    diffusion = GaussianDiffusion(schedules.make_schedule("cosine", 1000).betas, [0, 999])  # 2 DDIM steps
    s = dict(speed_mumc.QUICK, vision_depth=1, text_depth=2, fusion=1, batch=4, queue=16)
    net, _ = speed_mumc._torch_reference(s, sdpa=True)
    batch, draws = speed_mumc._batch_and_draws(s)
    t = lambda a: torch.tensor(np.asarray(a)).long()
    mumc_args = (torch.tensor(batch["images"].transpose(0, 3, 1, 2)), t(batch["input_ids"]), t(batch["mask"]), 0.4,
                 t(draws["keep"]), t(draws["keep_m"]), t(draws["masked_ids"]),
                 t(np.where(draws["target"], batch["input_ids"], -100)), t(draws["neg_img"]), t(draws["neg_txt"]))
    with torch.no_grad():
        outs = {"cris": (cris_eager(*inputs), cris_sdpa(*inputs)),
                "sdm": (diffusion.ddim_sample_loop(sdm_eager, x, labels, s=1.5),
                        diffusion.ddim_sample_loop(sdm_sdpa, x, labels, s=1.5))}
        with torch.device("meta"):
            cris_sdpa(*inputs)
            diffusion.ddim_sample_loop(sdm_sdpa, x, labels, s=1.5)
            net(*mumc_args)
    for name, (eager, sdpa) in outs.items():
        np.testing.assert_allclose(sdpa.numpy(), eager.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_device_check_dry_run_runs_the_script_in_bf16(tmp_path):
    """The script's own path on a CPU, every case (the suite is where CI runs it): bf16 rows named so,
    labelled cpu / bfloat16, the check's dtype in the note, each case in its own process."""
    out = tmp_path / "dry"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((out / "results.json").read_text())
    assert (doc["device"], doc["dtype"], doc["quick"]) == ("cpu", "bfloat16", True)
    assert {name: case["status"] for name, case in doc["cases"].items()} == dict.fromkeys(
        ("clipseg", "cris", "mumc", "sdm"), "ok")
    rows = {(r["case"], r["impl"]) for r in doc["rows"]}
    for case in ("clipseg/train 96px b4 bf16", "cris/train 96px b4 bf16", "mumc/pretrain_step 32px b8 bf16",
                 "sdm/train 32px b4 bf16", "sdm/ddim5 guided 32px b4 bf16"):
        assert {(case, "jax"), (case, "torch eager")} <= rows, case
    assert all((r["device"], r["dtype"]) == ("cpu", "bfloat16") for r in doc["rows"])
    # the correctness checks ran at bf16's tolerances
    notes = {r["case"]: r["note"] for r in doc["rows"] if r["impl"] == "jax"}
    assert notes["clipseg/infer 96px b4 bf16"].startswith("bfloat16 rel. err")
    assert notes["sdm/ddim5 guided 32px b4 bf16"].startswith("bfloat16 max|dx|")


@pytest.fixture
def pretend_cudnn(monkeypatch):
    """JAX's cuDNN attention traced on a CPU: its cuDNN-version and compute-capability probes answered as on
    an H100 (cuDNN 9.10, sm 9.0), so its shape checks run (what cannot run here is the kernel itself)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    from jaxboost.models import layers
    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(layers, "current_backend", lambda: "gpu")


KEY_PADDING = (4, 1, 1, 8)  # CRIS cross-attention, BERT: layers.cudnn_attention expands it to [T, S]


@pytest.mark.parametrize("mask_shape", [None, (4, 1, 16, 16), KEY_PADDING],
                         ids=["no mask (CLIPSeg vision, SDM)", "causal [B,1,T,S] (CLIP text)", "key padding"])
def test_cudnn_attention_traces_with_the_masks_the_models_pass(pretend_cudnn, mask_shape):
    from jaxboost.models import layers
    q = jnp.zeros((4, 16, 2, 64), jnp.bfloat16)
    kv = jnp.zeros((4, mask_shape[-1] if mask_shape else 16, 2, 64), jnp.bfloat16)
    mask = None if mask_shape is None else jnp.ones(mask_shape, bool)
    out = jax.eval_shape(lambda q, kv, m: layers.dot_product_attention(q, kv, kv, mask=m), q, kv, mask)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16


def test_full_sdm_at_a_smaller_size_is_the_same_network():
    """The CPU's full SDM (FULL_CPU_SIZE) keeps the 256 px network: the same parameter tree, shape for shape
    (attention at the same U-Net levels); a size the U-Net cannot halve 5 times is refused by name."""
    from benchmarks import speed_sdm
    from jaxboost.config import load_config
    from jaxboost.models.sdm import Model
    full = {**dict(load_config("configs/sdm.py:full").model), "dtype": "float32"}
    small = speed_sdm.full_at_size(full, 128)
    assert small["attention_resolutions"] == (16, 8, 4) and small["image_size"] == 128

    def shapes(f):
        s = f["image_size"]
        return jax.tree.map(lambda a: a.shape, jax.eval_shape(
            lambda: Model(**f).init(jax.random.key(0), jnp.zeros((1, s, s, f["in_channels"])),
                                    jnp.zeros((1,), jnp.int32), jnp.zeros((1, s, s, f["num_labels"])))))
    assert shapes(small) == shapes(full)
    with pytest.raises(ValueError, match="BENCH_SDM_SIZE=100"):
        speed_sdm.full_at_size(full, 100)
    with pytest.raises(ValueError, match="BENCH_SDM_SIZE='big'"):
        speed_sdm.full_at_size(full, "big")


def test_sdm_step_memory_is_checked_from_xla_before_allocating(monkeypatch):
    """The JAX part asks XLA for the step's peak (compiled from shapes) and refuses with one line naming
    the need when the machine has less free memory."""
    from benchmarks import speed_sdm
    fields, batch, _ = speed_sdm._fields(True, Setting())
    peak = speed_sdm.check_step_memory(fields, batch)
    assert peak > 0
    page = os.sysconf("SC_PAGE_SIZE")
    monkeypatch.setattr(speed_sdm.os, "sysconf",
                        lambda name: int(peak // 2 // page) if name == "SC_AVPHYS_PAGES" else page)
    with pytest.raises(MemoryError, match=r"SDM train step 32px b4: XLA needs .* GiB free; set BENCH_SDM_SIZE"):
        speed_sdm.check_step_memory(fields, batch)
