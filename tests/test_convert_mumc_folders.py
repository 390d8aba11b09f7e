"""`jaxboost convert bert|mae|albef` folders in the MUMC commands: each starts a run exactly as its original
file does (every parameter, the momentum encoders and the queues equal), position tables at another grid are
resized as MUMC's interpolate_pos_embed (torch bicubic, align_corners=False), a VQA run starts from a
converted ALBEF folder, and one training step runs from the converted folders."""
import jax
import numpy as np
import pytest
import torch

from jaxboost import cli
from jaxboost.config import load_config
from jaxboost.models import vit
from jaxboost.train import mumc_pretrain, mumc_vqa
from mumc_sources import MODEL, VOCAB, write_albef, write_bert, write_mae

MAE_GRID, ALBEF_GRID, SIZE = 6, 8, 48        # the model's grid: 48 / 4 = 12 (both tables are resized)


def torch_interpolate(table, grid):
    """MUMC models/vision/vit.py interpolate_pos_embed, on a [1 + g*g, D] table."""
    t = torch.from_numpy(np.asarray(table))[None]
    old = int(round((t.shape[1] - 1) ** 0.5))
    pos = t[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    pos = torch.nn.functional.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([t[:, :1], pos.permute(0, 2, 3, 1).flatten(1, 2)], 1)[0].numpy()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mumc_files")
    sds = {"bert": write_bert(root / "bert"), "mae": write_mae(root / "mae.pth", MAE_GRID),
           "albef": write_albef(root / "albef.pth", ALBEF_GRID)}
    return root, sds


@pytest.fixture(scope="module")
def converted(files):
    root, _ = files
    out = root / "converted"
    assert cli.main(["convert", "bert", "--src", str(root / "bert"), "--out", str(out / "bert")]) == 0
    assert cli.main(["convert", "mae", "--src", str(root / "mae.pth"), "--out", str(out / "mae")]) == 0
    assert cli.main(["convert", "albef", "--src", str(root / "albef.pth"), "--out", str(out / "albef"),
                     "--tokenizer", str(out / "bert"), "--config", "configs/mumc_pretrain.py:tiny",
                     "--set", *MODEL, f"model.image_size={ALBEF_GRID * 4}"]) == 0
    return out


def _config(*extra):
    return load_config("configs/mumc_pretrain.py:tiny", [*MODEL, f"model.image_size={SIZE}", *extra])


def _state(config, workdir):
    tokenizer = mumc_pretrain.get_tokenizer(config, workdir)
    model = mumc_pretrain.build_model(config, tokenizer.vocab_size)
    tx = mumc_pretrain.make_optimizer(config, 10, 5, frozen=mumc_pretrain.frozen_params(config))
    state = mumc_pretrain.make_init_fn(config, model, tx)(mumc_pretrain.starting_point(config))
    return tokenizer, jax.device_get(state)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("old,new", [(16, 24), (14, 16), (8, 6), (5, 5)])
def test_position_table_resize_matches_mumc_interpolate_pos_embed(old, new):
    table = np.random.default_rng(0).normal(size=(1 + old * old, 8)).astype(np.float32)
    got = vit.interpolate_pos_embed(table, new)
    # torch's float32 kernel is off its own float64 result by up to ~4e-6 on N(0, 1) tables; ours by ~2e-7
    np.testing.assert_allclose(got, torch_interpolate(table, new), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, torch_interpolate(table.astype(np.float64), new), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0], table[0])   # the class row is kept


def test_converted_bert_and_mae_folders_start_as_their_files(files, converted, tmp_path):
    root, sds = files
    table = ["model.vision_posemb=table"]
    tok_a, a = _state(_config(f"init.bert={root / 'bert'}", f"init.mae={root / 'mae.pth'}", *table), tmp_path / "a")
    tok_b, b = _state(_config(f"init.bert={converted / 'bert'}", f"init.mae={converted / 'mae'}", *table),
                      tmp_path / "b")
    _assert_trees_equal(a.params, b.params)
    _assert_trees_equal(a.extra, b.extra)
    assert tok_a.vocab_size == tok_b.vocab_size == len(VOCAB) and tok_b.token_id("ventricle") == 7
    # MUMC's build_visual_encoder: MAE's 6 x 6 sin-cos table resized to the 12 x 12 grid
    mae_table = sds["mae"]["pos_embed"][0].numpy()
    np.testing.assert_allclose(b.params["vision"]["pos_embedding"], torch_interpolate(mae_table, SIZE // 4),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.params["text"]["layer3"]["intermediate"]["kernel"],
                                  sds["bert"]["encoder.layer.3.intermediate.dense.weight"].numpy().T)


def test_converted_albef_folder_starts_as_its_file(files, converted, tmp_path):
    root, sds = files
    common = [f"init.bert={root / 'bert'}", "model.vision_posemb=table"]
    _, a = _state(_config(*common, f"init.albef={root / 'albef.pth'}"), tmp_path / "a")
    _, b = _state(_config(*common, f"init.albef={converted / 'albef'}"), tmp_path / "b")
    _assert_trees_equal(a.params, b.params)   # ITM head: the new run's own init both times
    _assert_trees_equal(a.extra, b.extra)
    sd = sds["albef"]
    for tree, key in ((b.params, "visual_encoder.pos_embed"), (b.extra["momentum"], "visual_encoder_m.pos_embed")):
        np.testing.assert_allclose(tree["vision"]["pos_embedding"], torch_interpolate(sd[key][0].numpy(), SIZE // 4),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b.extra["queues"]["image"], sd["image_queue"].numpy().T)
    np.testing.assert_allclose(b.params["temp"], 0.05)


def test_vqa_starts_from_a_converted_albef_folder(files, converted, tmp_path):
    root, sds = files
    config = load_config("configs/mumc_vqa.py:tiny", [
        *[m for m in MODEL if not m.startswith(("model.embed_dim", "queue_size"))], "model.decoder_depth=2",
        "model.image_size=64", f"model.pretrain_image_size={SIZE}", f"init_from={converted / 'albef'}"])
    model = mumc_vqa.build_model(config, len(VOCAB))
    params, momentum, tokenizer = mumc_vqa.pretrained_params(config, model, str(converted / "albef"))
    sd = sds["albef"]
    assert tokenizer.vocab_size == len(VOCAB)
    np.testing.assert_allclose(params["vision"]["pos_embedding"],
                               torch_interpolate(sd["visual_encoder.pos_embed"][0].numpy(), SIZE // 4),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(params["decoder"]["layer0"]["crossattention"]["query"]["kernel"],
                                  sd["text_encoder.bert.encoder.layer.2.crossattention.self.query.weight"].numpy().T)
    np.testing.assert_array_equal(momentum["text"]["layer0"]["output"]["kernel"],
                                  sd["text_encoder_m.bert.encoder.layer.0.output.dense.weight"].numpy().T)


def test_unknown_folders_are_refused_in_one_line(files, tmp_path):
    (tmp_path / "empty").mkdir()
    for field in ("bert", "mae", "albef"):
        config = _config(f"init.{field}={tmp_path / 'empty'}", "data.tokenizer=" + str(files[0] / "bert"))
        with pytest.raises(ValueError, match=str(tmp_path / "empty")) as e:
            mumc_pretrain.starting_point(config)
        assert "\n" not in str(e.value)


@pytest.mark.slow   # one jitted MUMC step: ~110 s on the shared 2-core machine
def test_one_pretraining_step_from_converted_folders_keeps_the_table_frozen(converted, tmp_path):
    from sdm_helpers import phantom_corpus
    corpus = phantom_corpus(tmp_path, patients=2, size=32)
    config = load_config("configs/mumc_pretrain.py:tiny", [
        *MODEL, "model.image_size=32", "model.vision_posemb=table", f"init.bert={converted / 'bert'}",
        f"init.albef={converted / 'albef'}", f"data.corpus={corpus}", "total_steps=1", "ckpt_every=0",
        "log_every=1"])
    summary = mumc_pretrain.train(config, tmp_path / "run")
    assert summary["final_step"] == 1
    state = jax.device_get(mumc_pretrain.restore(config, tmp_path / "run")[3])
    start = jax.device_get(mumc_pretrain.make_init_fn(config, mumc_pretrain.build_model(config, len(VOCAB)),
                                                      mumc_pretrain.make_optimizer(config, 1))(
        mumc_pretrain.starting_point(config)))
    np.testing.assert_array_equal(state.params["vision"]["pos_embedding"], start.params["vision"]["pos_embedding"])
    assert not np.array_equal(state.params["vision"]["cls_token"], start.params["vision"]["cls_token"])


@pytest.fixture(scope="module")
def echo_vqa(tmp_path_factory):
    from jaxboost.data import echo_vqa as echo
    from sdm_helpers import phantom_corpus
    root = tmp_path_factory.mktemp("echo_vqa")
    echo.build_echo_vqa(phantom_corpus(root, patients=2, size=32), root / "vqa")
    return root / "vqa"


def test_converted_vqa_checkpoint_is_a_vqa_run(files, converted, echo_vqa, tmp_path):
    from mumc_sources import write_vqa
    from jaxboost.convert import albef
    from jaxboost.train import runs
    src = tmp_path / "vqa.pth"
    write_vqa(src, ALBEF_GRID)
    out = tmp_path / "vqa_run"
    sets = [m for m in MODEL if not m.startswith(("model.embed_dim", "queue_size"))]
    assert cli.main(["convert", "albef", "--target", "vqa", "--src", str(src), "--out", str(out), "--tokenizer",
                     str(converted / "bert"), "--config", "configs/mumc_vqa.py:tiny", "--set", *sets,
                     "model.image_size=48"]) == 0
    run = runs.open_run(out, _vqa_run_config(out, echo_vqa), prefer="latest")
    want, _, _ = albef.load_albef(str(src), "vqa")
    assert run.config.model.pretrain_image_size == ALBEF_GRID * 4 and run.config.model.image_size == 48
    _assert_trees_equal(jax.device_get(run.state.params), want)
    assert run.task.tokenizer.vocab_size == len(VOCAB)
    # a finetune from it loads the VQA tree as it is (the loop's init_from), with the folder's vocabulary
    config = _vqa_run_config(out, echo_vqa)
    config.init_from = str(out)
    task = mumc_vqa.make_task(config, tmp_path / "finetune")
    assert not task.info["init_from_mapped"] and task.tokenizer.vocab_size == len(VOCAB)


def _vqa_run_config(folder, root):
    from jaxboost.train import workdir as workdir_lib
    config = workdir_lib.read_config(folder)
    config.data.root = str(root)
    return config
