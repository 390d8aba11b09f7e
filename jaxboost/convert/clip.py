"""OpenAI CLIP state dicts (and the CLIP parts of CRIS checkpoints) -> jaxboost.models.clip variables.

Shared helpers for the CLIPSeg and CRIS converters: read a local checkpoint without unrestricted
unpickling, take tensors by name while recording which were used, and check the result against the
module's own variable shapes so that a missing, unmapped or mis-shaped tensor is an error that names it.
"""
from __future__ import annotations

import json
import os

import numpy as np

from jaxboost.convert.torch_files import load_state_dict  # noqa: F401  (re-exported)


class Taker:
    """Takes tensors from a state dict by name (float32, torch layouts converted) and records use."""

    def __init__(self, sd: dict[str, np.ndarray], source: str):
        self.sd, self.source, self.used = sd, source, set()

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.sd:
            raise ValueError(f"{self.source}: tensor {name!r} missing from the checkpoint")
        self.used.add(name)
        return np.asarray(self.sd[name], np.float32)

    def has(self, name: str) -> bool:
        return name in self.sd

    def skip(self, *names: str) -> None:
        """Mark tensors as deliberately unused (the caller documents why)."""
        self.used.update(n for n in names if n in self.sd)

    def dense(self, prefix: str, bias: bool = True) -> dict:
        out = {"kernel": self(prefix + ".weight").T}
        if bias:
            out["bias"] = self(prefix + ".bias")
        return out

    def ln(self, prefix: str) -> dict:
        return {"scale": self(prefix + ".weight"), "bias": self(prefix + ".bias")}

    def conv(self, name: str) -> np.ndarray:
        return self(name).transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> flax [kh, kw, I, O]

    def conv_transpose(self, name: str) -> np.ndarray:
        # torch ConvTranspose2d [I, O, kh, kw] is the gradient of a conv; flax ConvTranspose with
        # transpose_kernel=False needs the spatially flipped kernel laid out [kh, kw, I, O].
        return self(name)[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)

    def packed_attention(self, prefix: str, out_name: str = "out_proj") -> dict:
        """nn.MultiheadAttention (in_proj_weight [3D, D]) -> our query/key/value/out Dense params."""
        w, b = self(prefix + ".in_proj_weight"), self(prefix + ".in_proj_bias")
        d = w.shape[0] // 3
        out = {n: {"kernel": w[i * d:(i + 1) * d].T, "bias": b[i * d:(i + 1) * d]}
               for i, n in enumerate(("query", "key", "value"))}
        out["out"] = self.dense(f"{prefix}.{out_name}")
        return out

    def conv_bn(self, conv: str, bn: str, params: dict, stats: dict, ours: str) -> None:
        """A torch Conv2d(bias=False) + BatchNorm2d pair -> our ConvBN `ours` (params and batch_stats)."""
        params[ours] = {"conv": {"kernel": self.conv(conv + ".weight")},
                        "bn": {"scale": self(bn + ".weight"), "bias": self(bn + ".bias")}}
        stats[ours] = {"bn": {"mean": self(bn + ".running_mean"), "var": self(bn + ".running_var")}}
        self.skip(bn + ".num_batches_tracked")

    def unused(self) -> list[str]:
        return sorted(k for k in self.sd if k not in self.used)


def check_variables(converted: dict, expected, source: str) -> dict:
    """Compare a converted variable tree with `jax.eval_shape(module.init, ...)`; return it as jnp arrays.

    Raises ValueError naming every missing, unexpected or mis-shaped leaf.
    """
    import jax
    from flax import traverse_util
    got = traverse_util.flatten_dict(converted, sep="/")
    want = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.shape, expected,
                                                             is_leaf=lambda x: hasattr(x, "shape")),
                                      sep="/")
    problems = [f"missing {k}" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    problems += [f"{k}: shape {tuple(np.shape(got[k]))} != model {tuple(want[k])}"
                 for k in want if k in got and tuple(np.shape(got[k])) != tuple(want[k])]
    if problems:
        raise ValueError(f"{source}: converted weights do not fit the model: " + "; ".join(problems[:12])
                         + (" ..." if len(problems) > 12 else ""))
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), converted)


def fill_missing(converted: dict, expected, seed: int = 0) -> dict:
    """Add the leaves of `expected` (eval_shape of init) that `converted` lacks, freshly initialised in numpy:
    kernels/embeddings ~ N(0, 1/fan_in), LayerNorm/BatchNorm scales and running variances 1, the rest 0.
    (A flax init of the whole model would compile every initializer: ~1 min for CRIS on a small CPU.)"""
    import jax
    from flax import traverse_util
    rng = np.random.default_rng(seed)
    got = traverse_util.flatten_dict(converted, sep="/")
    for path, leaf in traverse_util.flatten_dict(
            jax.tree_util.tree_map(lambda x: x, expected, is_leaf=lambda x: hasattr(x, "shape")), sep="/").items():
        if path in got:
            continue
        name, shape = path.rsplit("/", 1)[-1], tuple(leaf.shape)
        if name in ("kernel", "embedding", "pos_embedding"):
            fan_in = int(np.prod(shape[:-1])) if name == "kernel" else shape[-1]
            got[path] = rng.normal(0.0, fan_in ** -0.5, shape).astype(np.float32)
        elif name in ("scale", "var"):
            got[path] = np.ones(shape, np.float32)
        else:
            got[path] = np.zeros(shape, np.float32)
    return traverse_util.unflatten_dict(got, sep="/")


def fail_on_unmapped(take: Taker) -> None:
    left = take.unused()
    if left:
        raise ValueError(f"{take.source}: {len(left)} tensors not mapped: {left[:12]}"
                         + (" ..." if len(left) > 12 else ""))


# ----------------------------------------------------------------------------------------- OpenAI layout

def openai_text_variables(take: Taker, prefix: str = "") -> tuple[dict, dict]:
    """OpenAI CLIP text tower (`token_embedding`, `transformer.resblocks.i`, `ln_final`,
    `text_projection`) -> (TextEncoder params, TextEncoder fields)."""
    emb = take(prefix + "token_embedding.weight")
    pos = take(prefix + "positional_embedding")
    depth = len({k.split(".")[2 + prefix.count(".")] for k in take.sd
                 if k.startswith(prefix + "transformer.resblocks.")})
    params = {"token_embedding": {"embedding": emb}, "pos_embedding": pos,
              "ln_final": take.ln(prefix + "ln_final")}
    for i in range(depth):
        src = f"{prefix}transformer.resblocks.{i}."
        params[f"block{i}"] = {"ln1": take.ln(src + "ln_1"), "attn": take.packed_attention(src + "attn"),
                               "ln2": take.ln(src + "ln_2"),
                               "mlp": {"fc1": take.dense(src + "mlp.c_fc"), "fc2": take.dense(src + "mlp.c_proj")}}
    proj = take(prefix + "text_projection")  # [width, embed]; used as x @ proj
    params["text_projection"] = {"kernel": proj}
    width = emb.shape[1]
    fields = dict(vocab_size=emb.shape[0], width=width, depth=depth, num_heads=width // 64,
                  mlp_dim=4 * width, context_length=pos.shape[0], projection_dim=proj.shape[1],
                  eos_token_id=None)
    return params, fields


def openai_resnet_variables(take: Taker, prefix: str = "visual.", pool: str = "clip") -> tuple[dict, dict, dict]:
    """OpenAI CLIP ModifiedResNet (`visual.conv1` ... `visual.attnpool`) -> (params, batch_stats, fields).

    pool="cris" also maps CRIS's `attnpool.connect` residual and leaves the class-token position unused
    (CRIS pools every position; its row 0 is kept in the parameter so the shapes match CLIP's)."""
    if not take.has(prefix + "layer1.0.conv1.weight"):
        raise ValueError(f"{take.source}: no {prefix}layer1.0.conv1.weight: not a CLIP ResNet checkpoint"
                         + (" (this looks like a CLIP ViT)" if take.has(prefix + "class_embedding") else ""))
    params, stats = {}, {}
    for i in (1, 2, 3):
        take.conv_bn(f"{prefix}conv{i}", f"{prefix}bn{i}", params, stats, f"stem{i}")
    stage_sizes = []
    for stage in (1, 2, 3, 4):
        n = len({k.split(".")[len(prefix.split(".")) + 0] for k in take.sd
                 if k.startswith(f"{prefix}layer{stage}.")})
        stage_sizes.append(n)
        for i in range(n):
            src, ours = f"{prefix}layer{stage}.{i}.", f"layer{stage}_{i}"
            p, s = {}, {}
            for j in (1, 2, 3):
                take.conv_bn(f"{src}conv{j}", f"{src}bn{j}", p, s, f"c{j}")
            if take.has(src + "downsample.0.weight"):
                take.conv_bn(src + "downsample.0", src + "downsample.1", p, s, "downsample")
            params[ours], stats[ours] = p, s
    a = prefix + "attnpool."
    pos = take(a + "positional_embedding")
    pool_params = {"pos_embedding": pos, "query": take.dense(a + "q_proj"), "key": take.dense(a + "k_proj"),
                   "value": take.dense(a + "v_proj"), "out": take.dense(a + "c_proj")}
    pool_stats = {}
    if pool == "cris":
        take.conv_bn(a + "connect.0", a + "connect.1", pool_params, pool_stats, "connect")
    params["attnpool"] = pool_params
    if pool_stats:
        stats["attnpool"] = pool_stats
    width = params["stem3"]["conv"]["kernel"].shape[-1]
    embed = width * 32
    grid = int(round((pos.shape[0] - 1) ** 0.5))
    fields = dict(stage_sizes=tuple(stage_sizes), width=width, num_heads=embed // 64,
                  output_dim=pool_params["out"]["kernel"].shape[1], image_size=grid * 32, pool=pool)
    return params, stats, fields


# -------------------------------------------------------------------------------- Hugging Face layout

def hf_block(take: Taker, src: str) -> dict:
    """One HF CLIP(Seg) encoder/decoder layer -> PreNormBlock/PostNormBlock params (same names)."""
    attn = {o: take.dense(f"{src}self_attn.{h}") for o, h in
            (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj"))}
    return {"ln1": take.ln(src + "layer_norm1"), "attn": attn, "ln2": take.ln(src + "layer_norm2"),
            "mlp": {"fc1": take.dense(src + "mlp.fc1"), "fc2": take.dense(src + "mlp.fc2")}}


def hf_text_params(take: Taker, prefix: str, depth: int, projection: str) -> dict:
    """HF CLIPTextTransformer at `prefix` (+ the `projection` Linear) -> TextEncoder params."""
    params = {"token_embedding": {"embedding": take(prefix + "embeddings.token_embedding.weight")},
              "pos_embedding": take(prefix + "embeddings.position_embedding.weight"),
              "ln_final": take.ln(prefix + "final_layer_norm"),
              "text_projection": take.dense(projection, bias=False)}
    for i in range(depth):
        params[f"block{i}"] = hf_block(take, f"{prefix}encoder.layers.{i}.")
    return params


def hf_vision_params(take: Taker, prefix: str, depth: int, post_norm: bool) -> dict:
    """HF CLIPVisionTransformer at `prefix`, first `depth` layers -> clip_vit (vit.Model) params."""
    params = {"patch_embed": {"kernel": take.conv(prefix + "embeddings.patch_embedding.weight")},
              "cls_token": take(prefix + "embeddings.class_embedding"),
              "pos_embedding": take(prefix + "embeddings.position_embedding.weight"),
              "ln_pre": take.ln(prefix + "pre_layrnorm")}
    for i in range(depth):
        params[f"block{i}"] = hf_block(take, f"{prefix}encoder.layers.{i}.")
    if post_norm:
        params["ln_post"] = take.ln(prefix + "post_layernorm")
    return params


def save_converted(out_dir: str, model_name: str, fields: dict, variables: dict) -> None:
    """Write out_dir/model.json (model name and fields) and out_dir/variables.msgpack, atomically."""
    from flax import serialization
    os.makedirs(out_dir, exist_ok=True)
    for name, data in (("variables.msgpack", serialization.msgpack_serialize(
            __import__("jax").tree_util.tree_map(np.asarray, variables))),
                       ("model.json", json.dumps({"model_name": model_name, "model": fields}, indent=1).encode())):
        tmp = os.path.join(out_dir, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(out_dir, name))


def load_converted(out_dir: str):
    """Inverse of save_converted -> (module, variables)."""
    from flax import serialization
    from jaxboost import registry
    with open(os.path.join(out_dir, "model.json")) as f:
        meta = json.load(f)
    with open(os.path.join(out_dir, "variables.msgpack"), "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}
    return registry.model_class(meta["model_name"])(**fields), variables
