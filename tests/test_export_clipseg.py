"""`jaxboost export clipseg`: HF CLIPSeg -> jaxboost -> an HF folder that CLIPSegForImageSegmentation.from_pretrained
loads with the original model's logits."""
import numpy as np
import pytest
import torch
import transformers

from jaxboost.cli import main

from test_clipseg import SMALL as CLIPSEG_SMALL  # noqa: E402

# test_clipseg's tiny HF CLIPSeg with the simple head and an explicit eos id (export writes it back)
SMALL = dict({k: v for k, v in CLIPSEG_SMALL.items() if k != "use_complex_transposed_convolution"},
             text_config=dict(CLIPSEG_SMALL["text_config"], eos_token_id=99))

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


@pytest.mark.slow
def test_trained_clipseg_run_exports_to_hf_with_its_logits(tmp_path):
    import jax
    import jax.numpy as jnp
    from jaxboost.config import load_config
    from jaxboost.data import corpus as corpus_lib, phantom
    from jaxboost.train import runs, vl_seg
    ph = phantom.write_phantom(tmp_path / "phantom", patients=4, seed=0, size=(48, 40))
    items, info = corpus_lib.camus_items(ph, size=32, source="phantom")
    corpus_lib.build_corpus(items, tmp_path / "corpus", size=32, source="phantom", source_info=info)
    config = load_config("configs/clipseg.py:tiny", ["data.size=32", "model.vision_image_size=32", "batch_size=8",
                                                      "num_epochs=1", f"data.corpus={tmp_path / 'corpus'}"])
    vl_seg.train(config, str(tmp_path / "run"))
    assert main(["export", "clipseg", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.CLIPSegForImageSegmentation.from_pretrained(str(tmp_path / "hf")).eval()

    run = runs.open_run(tmp_path / "run")
    ids, mask = run.task.tokenizer.tokenize(["the left ventricle of the heart."] * 2, run.task.model.context_length)
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    ours = jax.jit(run.task.model.apply)(vl_seg.model_variables(run.state), jnp.asarray(pixels),
                                         jnp.asarray(ids), jnp.asarray(mask))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)),
                    pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits
    np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), atol=1e-4 * float(np.abs(ours).max()) + 1e-5)
