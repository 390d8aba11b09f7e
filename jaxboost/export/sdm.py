"""A jaxboost SDM run (or converted folder) -> a guided-diffusion / SDM `UNetModel` state dict.

  jaxboost export sdm --workdir W --out ema.safetensors [--attention-order legacy|new] [--weights ema|params]

The inverse of `jaxboost convert sdm`: every parameter gets upstream's name and torch layout (conv
[O, I, kh, kw], Linear [O, I], the attention's Conv1d [O, I, 1]). The fused qkv rows are written in the order
asked for: "legacy" ([head][q|k|v][head_dim], QKVAttentionLegacy, SDM's default) or "new" ([q|k|v][head]
[head_dim], QKVAttention, use_new_attention_order=True as echo_from_noise); by default the run's own order.
The UNetModel that reads the file must be built with that order. Safetensors; a .pt name writes torch.save.
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from jaxboost.convert.sdm import torch_name

_CONV1D = (".qkv.weight", ".proj_out.weight")


def attention_heads(model_config, block: str, channels: int) -> int:
    """Heads of the attention block `block` (our name) with `channels` channels, by upstream's rule."""
    if int(model_config.num_head_channels) != -1:
        return channels // int(model_config.num_head_channels)
    up = int(model_config.get("num_heads_upsample", -1))
    if block.startswith("output_blocks") and up != -1:
        return up
    return int(model_config.get("num_heads", 1))


def reorder_qkv(rows: np.ndarray, heads: int, new_order_in: bool, new_order_out: bool) -> np.ndarray:
    """Fused qkv rows (first axis, 3C) from one attention order to the other."""
    if new_order_in == new_order_out:
        return rows
    d = rows.shape[0] // (3 * heads)
    shape_in = (3, heads, d) if new_order_in else (heads, 3, d)
    return np.swapaxes(rows.reshape(shape_in + rows.shape[1:]), 0, 1).reshape(rows.shape)


def torch_state_dict(params, model_config, new_attention_order: bool | None = None) -> dict[str, np.ndarray]:
    """Our params tree -> {upstream name: float32 array in torch layout}."""
    own_order = bool(model_config.get("use_new_attention_order", False))
    order = own_order if new_attention_order is None else bool(new_attention_order)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    spade_blocks = {p[0].key for p, _ in flat if len(p) > 2 and p[2].key == "mlp_shared"}
    out = {}
    for path, leaf in flat:
        keys = tuple(k.key for k in path)
        name = torch_name(keys, keys[0] in spade_blocks)
        t = np.asarray(leaf, np.float32)
        if t.ndim == 4:
            t = t.transpose(3, 2, 0, 1)
        elif t.ndim == 2:
            t = t.T[..., None] if name.endswith(_CONV1D) else t.T
        if name.endswith((".qkv.weight", ".qkv.bias")):
            t = reorder_qkv(t, attention_heads(model_config, keys[0], t.shape[0] // 3), own_order, order)
        out[name] = np.ascontiguousarray(t)
    return out


def write_state_dict(state_dict: dict[str, np.ndarray], path: str) -> None:
    """safetensors (default) or, for a .pt/.pth name, torch.save; written to a temporary name and renamed."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    if path.endswith((".pt", ".pth", ".bin")):
        import torch
        torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp)
    else:
        from safetensors.numpy import save_file
        save_file(state_dict, tmp)
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="an SDM run folder or a `jaxboost convert sdm` folder")
    parser.add_argument("--out", required=True, help="state dict file (.safetensors; .pt for torch.save)")
    parser.add_argument("--attention-order", choices=("run", "legacy", "new"), default="run",
                        help="qkv layout to write (default: the run's model.use_new_attention_order)")
    parser.add_argument("--weights", choices=("ema", "params"), default="ema",
                        help="EMA params (what upstream samples with, ema_0.9999_*.pt) or the raw params")


def main(args) -> int:
    from jaxboost.train import runs
    from jaxboost.train import sdm as sdm_train
    if args.weights == "params":
        run = runs.open_run(args.workdir, prefer="latest", expect="sdm")
        config, params = run.config, run.state.params
    else:
        config, params, _ = sdm_train.load_run(args.workdir)
    order = {"run": None, "legacy": False, "new": True}[args.attention_order]
    state_dict = torch_state_dict(jax.device_get(params), config.model, order)
    write_state_dict(state_dict, args.out)
    n = sum(v.size for v in state_dict.values())
    print(f"wrote {args.out}: {len(state_dict)} tensors, {n:,} parameters")
    return 0
