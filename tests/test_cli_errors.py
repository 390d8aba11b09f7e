"""Bad input at the command line: each case ends in one line naming the file, field or item, a non-zero exit
status, and leaves its output as it was. Run in-process through `jaxboost.cli.main` (a subprocess per case
would pay the imports each time); one subprocess case checks the installed entry point itself."""
import json
import logging
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from jaxboost import cli, config as config_lib, jsonio
from jaxboost.data import camus, phantom, vqa

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ["phantom", "corpus build", "train", "eval", "synth", "convert clipseg", "vqa build", "demo"]


def run(capsys, *argv):
    """(exit status, stdout, stderr lines) of `jaxboost *argv`."""
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def assert_one_error_line(err_lines, *needles):
    assert err_lines, "nothing on stderr"
    last = err_lines[-1]
    assert last.startswith("jaxboost: error: "), err_lines
    assert "Traceback" not in "\n".join(err_lines)
    for needle in needles:
        assert needle in last, (needle, last)


# ------------------------------------------------------------------------------------------ the parser
def test_unknown_command_is_named_with_the_commands(capsys):
    status, _, err = run(capsys, "foo")
    assert status == 2
    assert_one_error_line(err, "unknown command 'foo'", *COMMANDS)


def test_misspelt_subcommand_suggests_the_close_one(capsys):
    status, _, err = run(capsys, "convert", "clipsge")
    assert status == 2
    assert_one_error_line(err, "unknown command 'convert clipsge'", "did you mean 'convert clipseg'")


@pytest.mark.parametrize("group,members,others", [
    ("convert", ["convert clipseg", "convert cris", "convert sdm", "convert bert", "convert albef"], ["phantom"]),
    ("vqa", ["vqa build"], ["phantom", "convert"]),
])
def test_group_help_lists_its_own_commands_and_exits_0(capsys, group, members, others):
    status, out, _ = run(capsys, group, "--help")
    assert status == 0
    for m in members:
        assert m in out
    for o in others:
        assert o not in out


def test_group_without_subcommand_is_an_error(capsys):
    status, _, err = run(capsys, "convert")
    assert status == 2
    assert_one_error_line(err, "'convert' needs a command", "convert clipseg", "convert albef")


def test_version_comes_from_the_package_metadata(capsys):
    status, out, _ = run(capsys, "--version")
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert status == 0 and out.strip() == f"jaxboost {expected}"


def test_phantom_help_describes_every_flag_with_its_default(capsys):
    status, out, _ = run(capsys, "phantom", "--help")
    assert status == 0
    blocks = {b.split()[0]: " ".join(b.split()) for b in out.split("options:")[1].split("\n  -")[1:]}
    for flag, default in [("-patients", "10"), ("-seed", "0"), ("-format", "nii"), ("-size", "[320, 256]")]:
        assert len(blocks[flag]) > 40 and blocks[flag].endswith(f"(default: {default})"), blocks[flag]
    assert "output folder" in blocks["-out"] and "default" not in blocks["-out"]


def test_bad_flag_value_of_a_subcommand_exits_2(capsys, tmp_path):
    status, _, err = run(capsys, "phantom", "--out", str(tmp_path / "p"), "--patients", "many")
    assert status == 2 and "--patients" in err[-1] and "'many'" in err[-1]
    assert not (tmp_path / "p").exists()


def test_phantom_out_that_is_a_file_is_named_and_kept(capsys, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    status, _, err = run(capsys, "phantom", "--out", str(target), "--patients", "1")
    assert status == 2
    assert_one_error_line(err, str(target), "is a file")
    assert target.read_text() == "mine"


def test_module_systemexit_message_becomes_one_error_line(capsys, tmp_path):
    status, _, err = run(capsys, "eval", "--workdir", str(tmp_path / "nope"))
    assert status == 2
    assert_one_error_line(err, str(tmp_path / "nope"))


def test_ctrl_c_outside_training_is_one_line_and_130(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(phantom, "write_phantom", interrupted)
    status, _, err = run(capsys, "phantom", "--out", str(tmp_path / "p"))
    assert status == 130 and err == ["jaxboost: interrupted"]


def test_traceback_flag_and_debug_env_show_the_error_itself(capsys, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise ValueError("the original error")
    monkeypatch.setattr(phantom, "write_phantom", broken)
    with pytest.raises(ValueError, match="the original error"):
        cli.main(["--traceback", "phantom", "--out", str(tmp_path / "p")])
    monkeypatch.setenv("JAXBOOST_DEBUG", "1")
    with pytest.raises(ValueError, match="the original error"):
        cli.main(["phantom", "--out", str(tmp_path / "p")])


def test_closed_pipe_ends_quietly(capsys, monkeypatch, tmp_path):
    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(phantom, "write_phantom", closed)
    status, _, err = run(capsys, "phantom", "--out", str(tmp_path / "p"))
    assert status == 141 and err == []


def test_entry_point_unknown_command_in_a_subprocess():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "jaxboost.cli", "foo"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("jaxboost: error: unknown command 'foo'")


# ------------------------------------------------------------------------------------------ configs
def train_argv(workdir, *extra, spec="configs/clipseg.py:tiny"):
    return ["train", "--config", spec, "--workdir", str(workdir), *extra]


def test_unknown_config_field_names_field_file_and_close_match(capsys, tmp_path):
    status, _, err = run(capsys, *train_argv(tmp_path / "w", "--config.optim.learning_rate=0.1"))
    assert status == 2
    assert_one_error_line(err, "unknown config field 'optim.learning_rate'", "configs/clipseg.py:tiny",
                          "optim.lr", "jaxboost config show")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override,field,kind", [
    ("--config.num_epochs=abc", "num_epochs", "an integer"),
    ("--config.optim.lr=fast", "optim.lr", "a number"),
    ("--config.model.freeze_encoders=maybe", "model.freeze_encoders", "true or false"),
    ("--config.model.eos_token_id=3", "model.eos_token_id", "is None"),
    ("--config.optim=3", "optim", "group of fields"),
])
def test_config_value_of_the_wrong_type_names_field_and_type(capsys, tmp_path, override, field, kind):
    status, _, err = run(capsys, *train_argv(tmp_path / "w", override))
    assert status == 2
    assert_one_error_line(err, "configs/clipseg.py:tiny", field, kind)
    assert not (tmp_path / "w").exists()


def test_config_without_variant_is_refused_listing_the_variants(capsys, tmp_path):
    status, _, err = run(capsys, *train_argv(tmp_path / "w", spec="configs/clipseg.py"))
    assert status == 2
    assert_one_error_line(err, "configs/clipseg.py", "no config variant", ":tiny", ":full")
    assert not (tmp_path / "w").exists()


def test_config_may_name_a_default_variant():
    assert config_lib.variant(None, ("tiny", "full"), default="full") == "full"
    with pytest.raises(config_lib.ConfigError, match="no config variant given"):
        config_lib.variant(None, ("tiny", "full"))


@pytest.mark.parametrize("text,problem", [
    ("def get_config(arg=None)\n    return 1\n", "syntax error on line 1"),
    ("X = 1\n", "defines no get_config"),
])
def test_broken_config_file_is_named(capsys, tmp_path, text, problem):
    path = tmp_path / "mine.py"
    path.write_text(text)
    status, _, err = run(capsys, *train_argv(tmp_path / "w", spec=f"{path}:tiny"))
    assert status == 2
    assert_one_error_line(err, str(path), problem)


def _config_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(tree, prefix=""):
    """Independent flattening of a to_dict() tree: {dotted name: value}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_config_show_lists_every_field_with_its_value(capsys):
    status, out, _ = run(capsys, "config", "show", "configs/sdm.py:tiny", "--config.total_steps=7")
    assert status == 0
    shown = dict(line.split(" = ", 1) for line in out.strip().splitlines())
    shown = {k.strip(): v for k, v in shown.items()}
    expected = _leaves(_config_module("sdm").get_config("tiny").to_dict())
    assert set(shown) == set(expected)
    assert shown["total_steps"] == "7" and shown["optim.lr"] == "0.0003" and shown["model.channel_mult"] == "(1, 2, 2)"
    assert shown["data.corpus"] == "''" and shown["sampler.name"] == "'ddim'"


def test_config_show_json_is_the_config(capsys):
    status, out, _ = run(capsys, "config", "show", "configs/mumc_vqa.py:full", "--json")
    reference = _config_module("mumc_vqa").get_config("full").to_dict()
    assert status == 0 and json.loads(out) == json.loads(json.dumps(reference))


def test_config_show_of_a_run_directory_shows_its_saved_config(capsys, tmp_path):
    reference = _config_module("cris").get_config("tiny").to_dict()
    (tmp_path / "config.json").write_text(json.dumps(reference))
    status, out, _ = run(capsys, "config", "show", str(tmp_path), "--config.num_epochs=3")
    shown = {k.strip(): v for k, v in (line.split(" = ", 1) for line in out.strip().splitlines())}
    assert status == 0 and set(shown) == set(_leaves(reference)) and shown["num_epochs"] == "3"
    status, _, err = run(capsys, "config", "show", str(tmp_path), "--config.num_epoch=3")
    assert status == 2
    assert_one_error_line(err, "config.json", "unknown config field 'num_epoch'", "num_epochs")
    status, _, err = run(capsys, "config", "show", str(tmp_path / "none"))
    assert status == 2


# ------------------------------------------------------------------------------------------ JSON inputs
def _vqa_item(i, **kw):
    return {"qid": i, "image_name": "img.png", "question": "q?", "answer": "yes", "answer_type": "CLOSED", **kw}


def test_malformed_vqa_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "trainset.json"
    path.write_text('[{"qid": 1,\n  "answer": "yes",,}]')
    with pytest.raises(ValueError, match=r"trainset\.json: not valid JSON \(.*line 2 column 19"):
        vqa.read_vqa_json(path, tmp_path)


def test_vqa_json_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "testset.json"
    path.write_bytes(b'[{"question": "\xff"}]')
    with pytest.raises(ValueError, match=r"testset\.json: not UTF-8"):
        vqa.read_vqa_json(path, tmp_path)


@pytest.mark.parametrize("answer", [2, 1.5, ["a", "b"], {"x": 1}, True])
def test_vqa_answer_that_is_not_a_string_is_refused_by_item_and_qid(tmp_path, answer):
    path = tmp_path / "testset.json"
    path.write_text(json.dumps([_vqa_item(0), _vqa_item(1, qid="q-17", answer=answer)]))
    with pytest.raises(ValueError, match=r"testset\.json: item 1 field 'answer' must be a string.*qid 'q-17'"):
        vqa.read_vqa_json(path, tmp_path)


def test_empty_vqa_list_is_refused(tmp_path):
    path = tmp_path / "trainset.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match=r"trainset\.json: the list is empty"):
        vqa.read_vqa_json(path, tmp_path)


def test_vqa_answer_of_only_punctuation_is_refused(tmp_path):
    path = tmp_path / "testset.json"
    path.write_text(json.dumps([_vqa_item(0, answer="?!")]))
    with pytest.raises(ValueError, match="item 0 field 'answer' '\\?!' is empty"):
        vqa.read_vqa_json(path, tmp_path)


@pytest.mark.parametrize("bad", [None, 3, ["yes"]])
def test_answer_list_with_a_non_string_entry_is_refused_by_index(tmp_path, bad):
    (tmp_path / "answer_list.json").write_text(json.dumps(["yes", "no", bad]))
    with pytest.raises(ValueError, match=r"answer_list\.json: entry 2 must be an answer string"):
        vqa.answer_candidates(tmp_path, "original")


@pytest.mark.parametrize("caption", [7, {"text": "LV"}, ["ok", None]])
def test_caption_that_is_not_a_string_is_refused_by_item(tmp_path, caption):
    from jaxboost.data import captions
    path = tmp_path / "captions_train.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": "fine"}, {"image": "b.png", "caption": caption}]))
    with pytest.raises(ValueError, match=r"captions_train\.json: item 1: image and caption must be strings"):
        captions.read_caption_json(path, tmp_path)


def test_phantom_negative_seed_and_huge_size_are_named(capsys, tmp_path):
    for flags, needle in [(["--seed", "-1"], "--seed must be >= 0"), (["--size", "40", "100000"], "--size must be")]:
        status, _, err = run(capsys, "phantom", "--out", str(tmp_path / "p"), "--patients", "1", *flags)
        assert status == 2
        assert_one_error_line(err, needle)
    assert not (tmp_path / "p").exists()


def test_malformed_tokenizer_config_json_is_named(tmp_path):
    from jaxboost.data.tokenize_clip import ClipTokenizer
    ClipTokenizer.train(["left ventricle of the heart."] * 4, str(tmp_path), vocab_size=300)
    (tmp_path / "tokenizer_config.json").write_text('{"model_max_length": 77,\n "eos_token": }')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON .*line 2 column 15"):
        ClipTokenizer.from_folder(str(tmp_path))


# ------------------------------------------------------------------------------------------ images, output
def test_constant_camus_image_is_refused_by_name(tmp_path):
    phantom.write_phantom(tmp_path, patients=1, seed=0, size=(48, 40))
    record = camus.read_camus(tmp_path)[0]
    phantom.write_image(record.image_path.parent / record.name, np.full((48, 40), 7, np.uint8), "nii")
    with pytest.raises(ValueError, match=rf"{record.name}\.nii\.gz: every pixel is 7"):
        record.load()


@pytest.mark.parametrize("age", ["-5", "300"])
def test_camus_age_out_of_range_is_named(tmp_path, age):
    path = tmp_path / "Info_2CH.cfg"
    path.write_text(f"ED: 1\nES: 9\nNbFrame: 20\nSex: F\nAge: {age}\nImageQuality: Good\n")
    with pytest.raises(ValueError, match=rf"Info_2CH\.cfg: Age must be between 0 and 130, got '{age}'"):
        camus.read_cfg(path)


def test_write_json_writes_nan_as_null_and_is_strict_json(tmp_path):
    path = tmp_path / "eval_test.json"
    jsonio.write_json(path, {"dice": float("nan"), "per_class": np.array([0.5, np.inf]), "n": np.int64(3),
                             "range": (1, 2)})

    def no_constants(name):
        raise AssertionError(f"bare {name} in the file")
    assert json.loads(path.read_text(), parse_constant=no_constants) == {
        "dice": None, "per_class": [0.5, None], "n": 3, "range": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["eval_test.json"]  # no temporary file left


def test_transformers_no_torch_notice_is_dropped_other_warnings_kept():
    import jaxboost  # noqa: F401  (installs the filter)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        logger.warning("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                       "file/data utilities can be used.")
        logger.warning("Token indices sequence length is longer than the specified maximum")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Token indices sequence length is longer than the specified maximum"]


@pytest.mark.parametrize("argv,needle", [
    (["train", "--workdir", "W", "--config.total_steps=1"], "--config configs/NAME.py:VARIANT is required"),
    (["train", "--config"], "--config configs/NAME.py:VARIANT is required"),
    (["config", "show", "configs/sdm.py:tiny", "stray"], "unexpected argument 'stray'"),
    (["config", "show", "configs/sdm.py:tiny", "--jsn"], "Unknown command line flag 'jsn'"),
])
def test_config_flags_missing_or_stray_are_named(capsys, argv, needle):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_one_error_line(err, needle)
