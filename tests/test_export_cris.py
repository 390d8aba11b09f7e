"""`jaxboost export cris`: CRIS.pytorch -> jaxboost -> CRIS.pytorch gives back every tensor, loaded strictly."""
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from benchmarks.torch_ref import cris as ref
from jaxboost.cli import main

CLIP_KW = dict(embed_dim=64, image_resolution=64, vision_layers=(1, 2, 1, 1), vision_width=16, context_length=12,
               vocab_size=50, transformer_width=32, transformer_heads=2, transformer_layers=2)
CRIS_KW = dict(fpn_in=(128, 256, 64), fpn_out=(16, 32, 64), num_layers=2, vis_dim=32, num_head=4, dim_ffn=48,
               word_dim=64)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_export_cris_round_trip_loads_strictly_with_the_same_tensors(tmp_path):
    torch.manual_seed(0)
    model = ref.CRIS(CLIP_KW, **CRIS_KW)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "cris.pth")
    assert main(["convert", "cris", "--checkpoint", str(tmp_path / "cris.pth"), "--out", str(tmp_path / "conv"),
                 "--num-heads", "4", "--text-heads", "2"]) == 0
    assert main(["export", "cris", "--workdir", str(tmp_path / "conv"), "--out", str(tmp_path / "back.safetensors")]) == 0
    exported = load_file(str(tmp_path / "back.safetensors"))
    fresh = ref.CRIS(CLIP_KW, **CRIS_KW)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked") or k == "backbone.logit_scale":  # not kept by jaxboost
            continue
        np.testing.assert_array_equal(exported[k], v.numpy(), err_msg=k)
