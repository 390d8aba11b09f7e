"""The restricted torch-file reader: every format torch writes loads to the same tensors as torch's own loader,
nothing in a file is executed (TorchScript code, pickled globals), bad files end in one line naming the file."""
import collections
import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxboost.convert.torch_files import load_state_dict, read_torch_file


def _weights():
    torch.manual_seed(0)
    a = torch.randn(3, 4)
    return {"a": a, "view": a[1:, 2:], "transposed": torch.arange(6).reshape(2, 3).t(), "half": torch.randn(5).half(),
            "bf16": torch.randn(4).bfloat16(), "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 2),
            "steps": torch.tensor(7)}


def _expected(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.is_floating_point() else t.numpy()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_torch_files_of_every_format_load_the_same_tensors(tmp_path, zip_format, protocol):
    weights = _weights()
    # a CRIS.pytorch train.py checkpoint: DDP "module." keys, optimizer state, MultiStepLR's Counter
    ckpt = {"epoch": 3, "best_iou": 0.5, "state_dict": collections.OrderedDict(("module." + k, v)
                                                                                for k, v in weights.items()),
            "optimizer": torch.optim.Adam([torch.nn.Parameter(torch.ones(2))]).state_dict(),
            "scheduler": {"milestones": collections.Counter([35]), "gamma": 0.1}}
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zip_format)
    sd = load_state_dict(str(path))
    assert sorted(sd) == sorted(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(sd[k], _expected(v), err_msg=k)
        assert sd[k].dtype == (np.float32 if v.is_floating_point() else np.int64)
    assert read_torch_file(str(path))["scheduler"]["milestones"] == collections.Counter([35])


def test_protocol_5_file_refused_by_torch_weights_only_loads(tmp_path):
    """medvlsm's convert_cris_model.py saves with pickle_protocol=5; torch's weights_only loader refuses it."""
    weights = {"neck.w": torch.randn(2, 2)}
    torch.save(weights, tmp_path / "cris.pt", pickle_protocol=5, _use_new_zipfile_serialization=False)
    with pytest.raises(Exception, match="149"):
        torch.load(tmp_path / "cris.pt", weights_only=True)
    np.testing.assert_array_equal(load_state_dict(str(tmp_path / "cris.pt"))["neck.w"], weights["neck.w"].numpy())


class _Trap(torch.nn.Module):
    """Its TorchScript __setstate__ runs at torch.jit.load and creates a file (torch.from_file, shared=True)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.blob = torch.zeros(1)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.path, self.training = state[0], state[1]
        self.blob = torch.from_file(self.path, shared=True, size=16)


class _Scripted(torch.nn.Module):
    def __init__(self, path: str):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.register_buffer("input_resolution", torch.tensor(224))
        self.attn_mask = torch.ones(2, 2)  # a plain tensor attribute, as OpenAI CLIP's: not in state_dict
        self.trap = _Trap(path)

    def forward(self, x):
        return self.trap(self.visual(x)) + self.attn_mask.sum()


def test_torchscript_archive_code_is_never_run_and_its_weights_load(tmp_path):
    target = tmp_path / "written_by_the_archive"
    scripted = torch.jit.script(_Scripted(str(target)))
    scripted.save(str(tmp_path / "RN50.pt"))
    # the trap is live: torch.jit.load runs it
    torch.jit.load(str(tmp_path / "RN50.pt"))
    assert target.exists()
    target.unlink()

    sd = load_state_dict(str(tmp_path / "RN50.pt"))
    assert not target.exists()
    expected = scripted.state_dict()
    assert sorted(sd) == sorted(expected)  # parameters and buffers; the attn_mask attribute is not one
    for k, v in expected.items():
        np.testing.assert_array_equal(sd[k], _expected(v), err_msg=k)


class _WritesAFile:
    """Unpickling this calls open(path, "w"): any unrestricted loader creates the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_lightning_checkpoint_loads_weights_without_running_its_pickled_objects(tmp_path):
    target = tmp_path / "created_by_unpickling"
    weights = {"net.backbone.w": torch.randn(3), "net.proj.b": torch.randn(2)}
    ckpt = {"state_dict": weights, "pytorch-lightning_version": "2.1.0", "global_step": 10,
            "hyper_parameters": {"net": _WritesAFile(str(target)),
                                 "optimizer": functools.partial(torch.optim.AdamW, lr=2e-5)},
            "optimizer_states": [], "lr_schedulers": []}
    torch.save(ckpt, tmp_path / "epoch=9.ckpt", pickle_protocol=5)
    sd = load_state_dict(str(tmp_path / "epoch=9.ckpt"))
    assert not target.exists()
    assert sorted(sd) == ["backbone.w", "proj.b"]
    np.testing.assert_array_equal(sd["backbone.w"], weights["net.backbone.w"].numpy())
    hyper = read_torch_file(str(tmp_path / "epoch=9.ckpt"))["hyper_parameters"]
    assert hyper["net"].global_name == "io.open"  # kept as an inert placeholder, never called


def test_pickled_objects_where_weights_belong_are_refused_by_name(tmp_path):
    torch.save({"w": torch.ones(2), "bad": _WritesAFile(str(tmp_path / "x"))}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match=r"sd\.pt.*bad \(io\.open\)"):
        load_state_dict(str(tmp_path / "sd.pt"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match=r"module\.pt.*torch\.nn\.modules\.linear\.Linear"):
        load_state_dict(str(tmp_path / "module.pt"))
    assert not (tmp_path / "x").exists()


def test_nan_weights_are_refused_by_name(tmp_path):
    torch.save({"ok": torch.ones(2), "decoder.bias": torch.tensor([1.0, float("nan")])}, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt: 1 tensors hold NaN or inf: \['decoder\.bias'\]"):
        load_state_dict(str(tmp_path / "nan.pt"))


@pytest.mark.parametrize("name,content", [("w.safetensors", b"\x00garbage" * 10), ("w.pt", b"not a pickle"),
                                          ("w.pt", b"PK\x03\x04broken zip")])
def test_garbage_weight_files_give_one_line_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "jaxboost.cli", "convert", "sdm", "--checkpoint", str(path),
                           "--out", str(out), "--config", "configs/sdm.py:tiny"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], proc.stderr
    assert not out.exists()


def test_torch_files_load_in_an_install_without_torch(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "w.pt")
    code = ("import sys; sys.modules['torch'] = None\n"  # import torch now raises ImportError
            "from jaxboost.convert.torch_files import load_state_dict\n"
            f"print(load_state_dict({str(tmp_path / 'w.pt')!r})['w'].tolist())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]"
