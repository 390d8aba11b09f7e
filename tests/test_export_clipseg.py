"""`jaxboost export clipseg`: HF CLIPSeg -> jaxboost -> an HF folder that CLIPSegForImageSegmentation.from_pretrained
loads with the original model's logits."""
import numpy as np
import pytest
import torch
import transformers

from jaxboost.cli import main

SMALL = dict(
    text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16, eos_token_id=99),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                       image_size=64, patch_size=16),
    projection_dim=24, extract_layers=(1, 2), reduce_dim=16, decoder_num_attention_heads=2,
    decoder_intermediate_size=32)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("complex_head", [True, False], ids=["complex_head", "plain_head"])
def test_exported_clipseg_folder_loads_in_hf_with_the_same_logits(tmp_path, complex_head):
    torch.manual_seed(0)
    config = transformers.CLIPSegConfig(**SMALL, use_complex_transposed_convolution=complex_head)
    original = transformers.CLIPSegForImageSegmentation(config).eval()
    original.save_pretrained(tmp_path / "hf")
    assert main(["convert", "clipseg", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "conv")]) == 0
    assert main(["export", "clipseg", "--workdir", str(tmp_path / "conv"), "--out", str(tmp_path / "out")]) == 0
    exported = transformers.CLIPSegForImageSegmentation.from_pretrained(str(tmp_path / "out")).eval()

    rng = np.random.default_rng(0)
    pixels = torch.tensor(rng.normal(size=(2, 3, 64, 64)), dtype=torch.float32)
    ids = torch.tensor(rng.integers(1, 90, size=(2, 6)))
    ids[:, -1] = 99
    with torch.no_grad():
        want = original(input_ids=ids, pixel_values=pixels).logits
        got = exported(input_ids=ids, pixel_values=pixels).logits
    assert float(want.abs().max()) > 1e-3
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-4 * float(want.abs().max()), rtol=0)
