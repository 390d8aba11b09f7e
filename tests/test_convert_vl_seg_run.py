"""Converted CLIPSeg and CRIS weights work in every command: `convert clipseg|cris` with a tokenizer writes a run
folder that `eval --workdir` scores zero-shot on a corpus given on the command line and `train
--config.init_from` finetunes (its architecture taken from the folder), holding the original weights exactly;
a finetuned CRIS run exports to a state dict CRIS.pytorch loads strictly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from benchmarks.torch_ref import cris as cris_ref
from jaxboost.cli import main
from jaxboost.data.tokenize_clip import ClipTokenizer
from jaxboost.train import runs, vl_seg
from jaxboost.train import workdir as workdir_lib
from sdm_helpers import phantom_corpus

SIZE = 32
RUN_SET = [f"data.size={SIZE}", "batch_size=8", "eval_batch_size=16", "num_epochs=1", "log_every=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return phantom_corpus(tmp_path_factory.mktemp("vlseg_run"), patients=4, size=SIZE)


def _tokenizer(corpus, folder) -> ClipTokenizer:
    return ClipTokenizer.train(vl_seg.corpus_prompts(str(corpus)), str(folder), 600, 77)


def _open(workdir, corpus):
    """The run at WORKDIR as `eval` opens it, on `corpus` (a converted folder records none)."""
    config = workdir_lib.read_config(workdir)
    config.data.corpus = str(corpus)
    return runs.open_run(workdir, config)


def _params(workdir, corpus) -> dict:
    return jax.tree.map(np.asarray, _open(workdir, corpus).state.params)


def _eval_and_finetune(model_name, out, corpus, tmp_path):
    """eval --workdir OUT on the corpus, then a one-epoch init_from finetune from OUT; -> the finetuned run."""
    assert main(["eval", "--workdir", str(out), "--split", "val", f"--config.data.corpus={corpus}"]) == 0
    scores = json.loads((out / "eval_val.json").read_text())
    assert 0 <= scores["val/dice_mean"] <= 100 and {"val/dice_LV", "val/dice_MYO", "val/dice_LA"} <= set(scores)
    run = tmp_path / "finetune"
    assert main(["train", "--config", f"configs/{model_name}.py:tiny", "--workdir", str(run),
                 f"--config.data.corpus={corpus}", f"--config.init_from={out}",
                 *(f"--config.{kv}" for kv in RUN_SET)]) == 0
    assert (run / "tokenizer" / "tokenizer.json").read_text() == (out / "tokenizer" / "tokenizer.json").read_text()
    return run


def _moved(before: dict, after: dict, prefix: str) -> float:
    flat_b = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(before[prefix])}
    flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(after[prefix])}
    return max(float(np.abs(flat_a[k] - flat_b[k]).max()) for k in flat_b)


def test_convert_clipseg_run_folder_refusals_and_pretrained(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    ClipTokenizer.train(["the left ventricle of the heart.", "the myocardium, a thick wall."], str(hf_dir), 300, 77)
    torch.manual_seed(0)
    hf_config = transformers.CLIPSegConfig(
        text_config=dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=24, extract_layers=(1,), reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    hf = transformers.CLIPSegForImageSegmentation(hf_config)
    hf.save_pretrained(hf_dir)
    out = tmp_path / "converted"
    convert = ["convert", "clipseg", "--hf", str(hf_dir), "--out", str(out), "--set", *RUN_SET, "--config"]
    # the tokenizer (the BPE's own size, > 200) does not fit the text tower: named, nothing written
    assert main(convert + ["configs/clipseg.py:tiny"]) != 0
    assert "vocab_size=200 is smaller than the tokenizer's" in capsys.readouterr().err and not out.exists()
    hf_config.text_config.vocab_size = 400
    hf = transformers.CLIPSegForImageSegmentation(hf_config)
    hf.save_pretrained(hf_dir)
    assert main(convert + ["configs/cris.py:tiny"]) != 0   # a config of the other model
    assert "not a 'clipseg' one" in capsys.readouterr().err and not out.exists()
    assert main(convert + ["configs/clipseg.py:tiny"]) == 0
    listing = sorted(p.name for p in out.iterdir())
    assert listing == ["ckpt", "config.json", "model.json", "tokenizer", "variables.msgpack"]
    assert main(convert + ["configs/clipseg.py:tiny"]) != 0   # a second conversion into the run is refused
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == listing
    # the same folder still serves pretrained=
    config = workdir_lib.read_config(out)
    config.pretrained = str(out)
    model = vl_seg.build_model(config, ClipTokenizer.from_folder(str(out / "tokenizer")))
    variables = vl_seg.host_variables(config, model)
    np.testing.assert_array_equal(variables["params"]["film_mul"]["bias"],
                                  hf.state_dict()["decoder.film_mul.bias"].numpy())


def test_init_from_takes_the_runs_architecture_and_refuses_another_model(tmp_path):
    from jaxboost.config import load_config
    source = load_config("configs/clipseg.py:tiny", ["model.vision_width=48", "model.freeze_encoders=False"])
    (tmp_path / "config.json").write_text(source.to_json_best_effort())
    config = vl_seg.with_init_from_architecture(load_config("configs/clipseg.py:tiny", [f"init_from={tmp_path}"]))
    assert config.model.vision_width == 48 and config.model.freeze_encoders   # its own training options kept
    with pytest.raises(ValueError, match="a 'clipseg' run, not a 'cris' one"):
        vl_seg.with_init_from_architecture(load_config("configs/cris.py:tiny", [f"init_from={tmp_path}"]))


@pytest.mark.slow
def test_converted_clipseg_folder_evaluates_and_finetunes(corpus, tmp_path):
    hf_dir = tmp_path / "hf"
    tokenizer = _tokenizer(corpus, hf_dir)      # the HF folder holds its tokenizer, as the hub's do
    torch.manual_seed(0)
    hf_config = transformers.CLIPSegConfig(
        text_config=dict(vocab_size=640, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=24, extract_layers=(1, 2), reduce_dim=16, decoder_num_attention_heads=2,
        decoder_intermediate_size=32)
    hf = transformers.CLIPSegForImageSegmentation(hf_config).eval()
    hf.save_pretrained(hf_dir)
    out = tmp_path / "converted"
    assert main(["convert", "clipseg", "--hf", str(hf_dir), "--out", str(out), "--config", "configs/clipseg.py:tiny",
                 "--set", *RUN_SET]) == 0

    # the run folder's model at its recorded config gives HF's logits
    run = _open(out, corpus)
    ids, mask = run.task.tokenizer.tokenize(["the left ventricle of the heart."] * 2, run.task.model.context_length)
    pixels = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    ours = run.task.model.apply(vl_seg.model_variables(run.state), jnp.asarray(pixels), jnp.asarray(ids),
                                jnp.asarray(mask))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.asarray(ids)), attention_mask=torch.tensor(np.asarray(mask)),
                    pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4 * float(np.abs(theirs).max()) + 1e-6, rtol=0)

    finetuned = _eval_and_finetune("clipseg", out, corpus, tmp_path)
    before, after = _params(out, corpus), _params(finetuned, corpus)
    assert _moved(before, after, "vision") == 0 and _moved(before, after, "text") == 0   # tiny: frozen encoders
    assert 0 < _moved(before, after, "film_mul") < 0.05


@pytest.mark.slow
def test_converted_cris_folder_evaluates_finetunes_and_exports(corpus, tmp_path):
    torch.manual_seed(0)
    clip_kw = dict(embed_dim=64, image_resolution=SIZE, vision_layers=(1, 1, 1, 1), vision_width=16,
                   context_length=77, vocab_size=640, transformer_width=32, transformer_heads=2, transformer_layers=1)
    cris_kw = dict(fpn_in=(128, 256, 64), fpn_out=(16, 32, 64), num_layers=1, vis_dim=32, num_head=4, dim_ffn=48,
                   word_dim=64)
    model = cris_ref.CRIS(clip_kw, **cris_kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "cris.pth")
    _tokenizer(corpus, tmp_path / "clip_tokenizer")
    out = tmp_path / "converted"
    assert main(["convert", "cris", "--checkpoint", str(tmp_path / "cris.pth"), "--out", str(out), "--num-heads",
                 "4", "--text-heads", "2", "--tokenizer", str(tmp_path / "clip_tokenizer"), "--config",
                 "configs/cris.py:tiny", "--set", *RUN_SET]) == 0
    before = _params(out, corpus)
    np.testing.assert_array_equal(before["proj"]["txt"]["bias"], original["proj.txt.bias"])

    finetuned = _eval_and_finetune("cris", out, corpus, tmp_path)
    after = _params(finetuned, corpus)
    assert 0 < _moved(before, after, "proj") < 0.05

    # the finetuned run exports to a state dict CRIS.pytorch loads strictly, holding the run's weights
    assert main(["export", "cris", "--workdir", str(finetuned), "--out", str(tmp_path / "back.safetensors")]) == 0
    exported = load_file(str(tmp_path / "back.safetensors"))
    cris_ref.CRIS(clip_kw, **cris_kw).load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()},
                                                      strict=True)
    np.testing.assert_array_equal(exported["proj.txt.bias"], after["proj"]["txt"]["bias"])
    np.testing.assert_array_equal(exported["proj.txt.weight"], after["proj"]["txt"]["kernel"].T)
