"""SDM / guided-diffusion U-Net state dict (PyTorch) -> jaxboost.models.sdm params.

  jaxboost convert sdm --checkpoint ema_0.9999_100000.pt --config configs/sdm.py:echo_from_noise --out DIR

Every target parameter is named from its path in our module tree (which mirrors upstream's
`input_blocks.i.j` layout); every checkpoint tensor must be used and every shape must match, otherwise the
error names the tensor. The attention order and head counts cannot be read from the weights: they come from
the config (`model.use_new_attention_order`, `model.num_heads`, ...; echo_from_noise: the new order).
Output: DIR laid out as a finished SDM training run (DIR/config.json + an orbax checkpoint DIR/ckpt/0 whose
params and EMA params are the converted weights, with a fresh optimiser state), so that
`jaxboost synth --checkpoint DIR`, `jaxboost eval --workdir DIR` and `train --config.init_from=DIR` read it
as they read a run. Written to a temporary folder first and renamed, so a failed conversion leaves nothing.
"""
from __future__ import annotations

import argparse
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxboost.convert.torch_files import load_state_dict  # noqa: F401  (re-exported)

# flax top-level module name -> torch prefix
_TOP = [(r"^time_embed_(\d+)$", r"time_embed.\1"), (r"^out_(\d+)$", r"out.\1"),
        (r"^middle_block_(\d+)$", r"middle_block.\1"),
        (r"^(input_blocks|output_blocks)_(\d+)_(\d+)_(op|conv)$", r"\1.\2.\3.\4"),
        (r"^(input_blocks|output_blocks)_(\d+)_(\d+)$", r"\1.\2.\3")]
# inside a ResBlock: (plain GroupNorm32 block, SDM SPADE block)
_RESBLOCK = {"in_norm": ("in_layers.0", "in_norm"), "in_conv": ("in_layers.2", "in_layers.1"),
             "emb_dense": ("emb_layers.1", "emb_layers.1"), "out_norm": ("out_layers.0", "out_norm"),
             "out_conv": ("out_layers.3", "out_layers.2"), "skip_connection": ("skip_connection",) * 2}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
SIGNATURE = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


def torch_name(path: tuple[str, ...], spade: bool) -> str:
    """Our param path ('output_blocks_3_0', 'in_norm', 'mlp_shared', 'kernel') -> upstream tensor name."""
    top = path[0]
    for pattern, repl in _TOP:
        if re.match(pattern, top):
            top = re.sub(pattern, repl, top)
            break
    else:
        raise ValueError(f"no upstream name for parameter {'/'.join(path)}")
    inner = list(path[1:-1])
    if inner and inner[0] in _RESBLOCK:
        inner[0] = _RESBLOCK[inner[0]][int(spade)]
        if spade and len(inner) > 1 and inner[1] == "mlp_shared":
            inner[1] = "mlp_shared.0"
    return ".".join([top] + inner + [_LEAF[path[-1]]])


def _to_flax(tensor: np.ndarray, target_shape) -> np.ndarray:
    """torch layout -> flax layout: conv [O,I,kh,kw] -> [kh,kw,I,O]; linear/conv1d [O,I(,1)] -> [I,O]."""
    t = np.asarray(tensor, np.float32)
    if t.ndim == 4:
        t = t.transpose(2, 3, 1, 0)
    elif t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0].T
    elif t.ndim == 2:
        t = t.T
    return t


def model_from_config(model_config):
    from jaxboost.models.sdm import Model
    return Model(**dict(model_config))


def param_shapes(model) -> dict:
    s, c = model.image_size, model.in_channels
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, c)), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, s, s, model.num_labels)))
    return variables["params"]


def sdm_from_torch_state_dict(state_dict: dict, model_config, source: str = "state dict") -> dict:
    """Upstream SDM UNetModel tensors -> our params tree (numpy float32). Errors name the tensor at fault."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    missing_sig = [k for k in SIGNATURE if k not in sd]
    if missing_sig:
        raise ValueError(f"{source} is not an SDM/guided-diffusion U-Net checkpoint: no {missing_sig}; "
                         f"it holds e.g. {sorted(sd)[:5]}")
    if not any(".in_norm.mlp_shared.0.weight" in k for k in sd):
        raise ValueError(f"{source} is a guided-diffusion U-Net without SPADE blocks (no *.in_norm.mlp_shared.*): "
                         "not a semantic diffusion model")
    model = model_from_config(model_config)
    shapes = param_shapes(model)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    spade_blocks = {p[0].key for p, _ in flat if len(p) > 2 and p[2].key == "mlp_shared"}
    used, out = set(), {}
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        name = torch_name(keys, keys[0] in spade_blocks)
        if name not in sd:
            raise ValueError(f"{source}: tensor {name!r} (for {'/'.join(keys)}) missing; the checkpoint does not "
                             f"match the config (sizes, attention resolutions, resblock_updown?)")
        value = _to_flax(np.asarray(sd[name]), leaf.shape)
        if value.shape != leaf.shape:
            hint = ""
            if "mlp_shared" in name:
                hint = (f" (the checkpoint has num_labels={np.shape(sd[name])[1]}, the config "
                        f"num_labels={model.num_labels})")
            raise ValueError(f"{source}: tensor {name!r} has shape {np.shape(sd[name])} -> {value.shape}, expected "
                             f"{leaf.shape} for {'/'.join(keys)}{hint}")
        used.add(name)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"{source}: {len(unused)} tensors not mapped to the model (config too small?): "
                         f"{unused[:8]}")
    return out


def save_params(params, out_dir: str, config) -> None:
    """Write DIR as a finished SDM run at step 0 (see the module docstring); `config` is the whole run config."""
    from jaxboost.convert.run_folder import write_run_folder
    from jaxboost.train.optim import make_optimizer
    from jaxboost.train.sdm import abstract_state
    from jaxboost.train.state import initial_state
    abstract = abstract_state(config)
    params = jax.tree.map(lambda a, want: np.asarray(a, want.dtype), params, abstract.params)
    # what the SDM trainer's init makes, with the converted weights: EMA = params, a fresh optimiser
    state = initial_state(params, make_optimizer(config, 1), config.seed + 1, ema=True)
    write_run_folder(out_dir, config, state)


def load_params(out_dir: str):
    """The EMA params of a converted folder or any SDM run (numpy arrays on the host)."""
    from jaxboost.train import sdm as sdm_train
    _, params, _ = sdm_train.load_run(out_dir)
    return jax.tree.map(np.asarray, params)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="SDM state dict: .safetensors or .pt (weights only)")
    parser.add_argument("--out", required=True, help="output folder, laid out as an SDM run (config.json + ckpt/)")
    parser.add_argument("--config", default="configs/sdm.py:full",
                        help="run config to build and record (configs/sdm.py:echo_from_noise for its checkpoints)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. model.num_labels=4")


def main(args) -> int:
    from jaxboost.config import load_config
    config = load_config(args.config, args.set)
    params = sdm_from_torch_state_dict(load_state_dict(args.checkpoint), config.model, source=args.checkpoint)
    save_params(params, args.out, config)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    print(f"converted {n:,} parameters from {args.checkpoint} -> {os.path.abspath(args.out)} (an SDM run folder)")
    return 0
