"""A converted checkpoint written as a finished training run at step 0, so every command that opens a run
(`jaxboost eval --workdir`, `synth --checkpoint`, `train --config.init_from`, `export`) opens it as it is.

Layout: DIR/config.json (the whole run config, the converted architecture in config.model) + an orbax
checkpoint DIR/ckpt/0 holding the converted weights and a fresh optimiser state, plus what the trainer reads
beside it (the CLIP-style models: DIR/tokenizer; `pretrained=` reads DIR/model.json + variables.msgpack).
Everything is written into a temporary sibling folder and renamed into DIR, so a failed conversion leaves
DIR as it was."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

RUN_FILES = ("config.json", "ckpt")


def write_run_folder(out_dir: str, config, state, extras: Callable[[str], list[str]] | None = None) -> str:
    """Write `state` as step 0 of a run with `config` into out_dir; `extras(tmp)` writes further entries into
    the temporary folder and returns their names. Refused when out_dir already holds a run."""
    from jaxboost.train.checkpoints import Checkpoints
    out_dir = os.path.abspath(out_dir)
    if any(os.path.exists(os.path.join(out_dir, n)) for n in RUN_FILES):
        raise ValueError(f"{out_dir} already holds a run (config.json / ckpt); choose an empty --out folder")
    parent = os.path.dirname(out_dir) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert_", dir=parent)
    try:
        ckpts = Checkpoints(tmp, keep=1, async_save=False)
        ckpts.save(0, state, {"step": 0, "converted_from": "torch state dict"}, force=True)
        ckpts.close()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        names = list(RUN_FILES) + (extras(tmp) if extras else [])
        os.makedirs(out_dir, exist_ok=True)
        for name in names:
            target = os.path.join(out_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def add_vl_seg_arguments(parser, default_config: str) -> None:
    """The run-layout flags of `convert clipseg` and `convert cris`."""
    parser.add_argument("--tokenizer", default="",
                        help="local CLIP tokenizer folder (save_pretrained layout) recorded as the run's tokenizer; "
                             "default: the one in the HF folder, if any")
    parser.add_argument("--config", default=default_config,
                        help="run config recorded for eval / init_from (the architecture comes from the weights)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. data.size=352 model.freeze_encoders=False")


def module_fields(module) -> dict:
    """A flax module's constructor fields (what model.json records), without flax's own and the compute dtype."""
    return {k: getattr(module, k) for k in type(module).__dataclass_fields__ if k not in ("parent", "name", "dtype")}


def vl_seg_run_config(spec: str, overrides: list[str], model_name: str, module):
    """The run config `spec` with the converted module's architecture in config.model; no pretrained/init_from
    (the weights are in the folder) and no tokenizer path (the tokenizer is copied into it)."""
    from ml_collections import ConfigDict
    from jaxboost.config import load_config
    from jaxboost.train.vl_seg import RUNTIME_FIELDS
    config = ConfigDict(load_config(spec, overrides).to_dict())
    if config.get("model_name") != model_name:
        raise ValueError(f"--config {spec}: a {config.get('model_name')!r} config, not a {model_name!r} one")
    arch = {k: v for k, v in module_fields(module).items() if k not in RUNTIME_FIELDS}
    config.model = {**config.model.to_dict(), **arch}
    config.pretrained, config.init_from, config.data.tokenizer = "", "", ""
    return config


def write_vl_seg_run(out_dir: str, args, model_name: str, module, variables, tokenizer_dir: str) -> bool:
    """out_dir as a finished CLIPSeg/CRIS run at step 0 (config from --config/--set, the tokenizer copied from
    tokenizer_dir), also readable as a `pretrained=` folder (model.json + variables.msgpack). Without a
    tokenizer only the `pretrained=` files are written (returns False)."""
    from jaxboost.convert.clip import check_variables, save_converted
    from jaxboost.data.tokenize_clip import ClipTokenizer
    from jaxboost.train import tokenizer_setup, vl_seg
    from jaxboost.train.optim import make_optimizer
    from jaxboost.train.state import initial_state
    fields = module_fields(module)
    if not tokenizer_dir:
        save_converted(out_dir, model_name, fields, variables)
        return False
    config = vl_seg_run_config(args.config, args.set, model_name, module)
    tokenizer = ClipTokenizer.from_folder(tokenizer_dir, int(config.model.context_length))
    run_model = vl_seg.build_model(config, tokenizer)   # refuses a tokenizer larger than the vocabulary
    # the run's model at config.data.size must take the converted tensors as they are
    variables = check_variables(variables, vl_seg.variable_shapes(config, run_model), out_dir)
    frozen, lr_mults = vl_seg.encoder_groups(config)
    stats = {k: v for k, v in variables.items() if k != "params"}
    state = initial_state(variables["params"], make_optimizer(config, 1, frozen=frozen, lr_mults=lr_mults),
                          int(config.seed) + 1, extra=stats or None)

    def extras(tmp: str) -> list[str]:
        tokenizer_setup.copier(tokenizer_dir)(os.path.join(tmp, tokenizer_setup.TOKENIZER_DIR))
        save_converted(tmp, model_name, fields, variables)
        return [tokenizer_setup.TOKENIZER_DIR, "model.json", "variables.msgpack"]
    write_run_folder(out_dir, config, state, extras)
    return True
