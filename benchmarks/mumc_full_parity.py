"""Full-size MUMC starting point: ViT-B/16 and BERT-base weights in their original formats, converted and
loaded into configs/mumc_pretrain.py:full's towers, give torch's outputs.

Random weights built in memory (no download): the torch reference ViT-B/16 (benchmarks/torch_ref/mumc.py,
MAE's encoder layout) saved as MAE's `mae_pretrain_vit_base.pth` at 224 px with its 14 x 14 sin-cos table,
and transformers' BertModel at bert-base-uncased's config saved with save_pretrained. Both go through
`jaxboost convert mae|bert` into folders, then `init.mae` / `init.bert` of the full config (float32,
`vision_posemb=table`: MAE's table resized to the 16 x 16 grid of 256 px as MUMC's interpolate_pos_embed).
Compared on one 256 px image and one 25-token sentence: the image tokens (torch given the same table resized
by F.interpolate), MUMC's text-mode states (BERT layers 0-5, the layers before fusion) and the whole 12-layer
BERT (jaxboost.models.bert with the converted folder's fields) against BertModel's last_hidden_state.

  python -m benchmarks.mumc_full_parity [--tolerance 1e-4]
Prints max |jax - torch| / max |torch| per output and the seconds each stage took; exits 1 above tolerance.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks.torch_ref import mumc as ref
from jaxboost import cli
from jaxboost.config import load_config
from jaxboost.convert import bert as convert_bert
from jaxboost.models import bert, mumc, mumc_surgery
from jaxboost.train import mumc_pretrain

MAE_SIZE, TOKENS = 224, 25


def write_sources(root: Path):
    torch.manual_seed(0)
    vit = ref.VisionTransformer(img_size=MAE_SIZE, patch_size=16, embed_dim=768, depth=12, num_heads=12).eval()
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    sd["pos_embed"] = torch.from_numpy(mumc.sincos_table(MAE_SIZE // 16, 768))[None]
    torch.save({"model": sd}, root / "mae_pretrain_vit_base.pth")
    hf = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()   # bert-base-uncased
    hf.save_pretrained(root / "bert-base-uncased")
    return vit, hf, sd["pos_embed"][0]


def relative(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    times, errors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        vit, hf, mae_table = write_sources(root)
        times["build torch weights"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert cli.main(["convert", "mae", "--src", str(root / "mae_pretrain_vit_base.pth"), "--out",
                         str(root / "mae")]) == 0
        assert cli.main(["convert", "bert", "--src", str(root / "bert-base-uncased"), "--out",
                         str(root / "bert")]) == 0
        config = load_config("configs/mumc_pretrain.py:full", [
            "model.dtype=float32", "model.vision_posemb=table", "model.dropout_rate=0.0",
            f"init.mae={root / 'mae'}", f"init.bert={root / 'bert'}"])
        model = mumc_pretrain.build_model(config, 30522)
        towers = mumc_pretrain.starting_point(config)["towers"]
        text_fields, text_params = convert_bert.load_bert(str(root / "bert"))
        times["convert + load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        size = config.model.image_size
        ids0 = jnp.zeros((1, 4), jnp.int32)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), ids0,
                                                   jnp.ones_like(ids0))["params"])
        params, _ = mumc_surgery.overlay_params(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes), towers)
        image = np.random.default_rng(0).normal(size=(1, size, size, 3)).astype(np.float32)
        ids = np.random.default_rng(1).integers(1000, 30000, size=(1, TOKENS)).astype(np.int32)
        ids[0, 0], mask = 101, np.ones((1, TOKENS), np.int32)
        tokens, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, method=mumc.Model.encode_image))(params, image)
        hidden, _ = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, method=mumc.Model.encode_text))(
            params, ids, mask)
        full_bert = bert.Model(**dict(text_fields, dropout_rate=0.0, attention_dropout_rate=0.0))
        whole = jax.jit(lambda p, i, m: full_bert.apply({"params": p}, i, m, method=bert.Model.text))(
            text_params, ids, mask)
        jax.block_until_ready((tokens, hidden, whole))
        times["jax forward (compile included)"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with torch.no_grad():
            grid = size // 16
            patch_pos = ref.interpolate_patch_pos(mae_table[1:], grid)
            want_tokens = vit(torch.from_numpy(image).permute(0, 3, 1, 2), patch_pos=patch_pos).numpy()
            t_ids, t_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
            want_hidden = ref.bert_text_fusion(hf, t_ids, t_mask, None, config.model.fusion_layer, "text").numpy()
            want_whole = hf(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
        times["torch forward"] = time.perf_counter() - t0
        table_err = relative(params["vision"]["pos_embedding"][1:], patch_pos.numpy())
    errors = {"position table 14x14 -> 16x16": table_err, "ViT-B/16 image tokens [1, 257, 768]":
              relative(tokens, want_tokens), "BERT text-mode states (layers 0-5) [1, 25, 768]":
              relative(hidden, want_hidden), "BERT-base 12 layers [1, 25, 768]": relative(whole, want_whole)}
    for name, err in errors.items():
        print(f"{name:52s} max|jax - torch| / max|torch| = {err:.2e}")
    for name, t in times.items():
        print(f"{name:52s} {t:6.1f} s")
    bad = {k: v for k, v in errors.items() if not v <= args.tolerance}
    if bad:
        print(f"above tolerance {args.tolerance}: {sorted(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
