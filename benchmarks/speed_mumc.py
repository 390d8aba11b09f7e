"""MUMC pretraining step: jaxboost (one jitted step: losses, grads, AdamW, temperature clamp, momentum EMA,
enqueue) vs the PyTorch reference `MUMCPretrain` (MUMC's forward with its queues, backward, AdamW, momentum
update), same random weights (an ALBEF-layout checkpoint converted by jaxboost.convert.albef), same batch and
the same random draws (patch masks of both views, MLM masking, hard negatives), on the device and in the
precision of `harness.setting()` (BERT's "sdpa" attention and the ViT's scaled_dot_product_attention off the
float32 CPU default; ours "auto": cuDNN for bf16 on a GPU). The three losses are checked equal, to the
dtype's tolerance, before anything is timed."""
from __future__ import annotations

import copy
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.harness import Row

QUICK = dict(image=32, patch=8, width=64, vision_depth=2, heads=4, mlp=128, text_depth=4, fusion=2,
             vocab=500, embed=32, batch=8, seq=16, queue=64)
FULL = dict(image=256, patch=16, width=768, vision_depth=12, heads=12, mlp=3072, text_depth=12, fusion=6,
            vocab=30522, embed=256, batch=8, seq=25, queue=65536)
MASK_ID, SPECIAL = 3, (0, 1, 2)


def _torch_reference(s: dict, sdpa: bool = False):
    """Random-weight torch MUMC and its checkpoint (ALBEF layout) -> (net, state dict); `sdpa`: every
    attention through scaled_dot_product_attention (else the explicit softmax(QK^T)V)."""
    import torch
    import transformers
    from torch import nn

    from benchmarks.torch_ref import mumc as ref
    torch.manual_seed(0)
    mods = {"visual_encoder": ref.VisionTransformer(img_size=s["image"], patch_size=s["patch"], embed_dim=s["width"],
                                                    depth=s["vision_depth"], num_heads=s["heads"]),
            "text_encoder": transformers.BertLMHeadModel(transformers.BertConfig(
                vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["text_depth"],
                num_attention_heads=s["heads"], intermediate_size=s["mlp"], max_position_embeddings=64,
                is_decoder=True, add_cross_attention=True, attn_implementation="sdpa" if sdpa else "eager")),
            "vision_proj": nn.Linear(s["width"], s["embed"]), "text_proj": nn.Linear(s["width"], s["embed"]),
            "itm_head": ref.build_itm_head(s["width"])}
    grid = s["image"] // s["patch"]
    momentum = [copy.deepcopy(mods[k]) for k in ("visual_encoder", "text_encoder", "vision_proj", "text_proj")]
    queue = lambda: torch.nn.functional.normalize(torch.randn(s["embed"], s["queue"]), dim=0)
    net = ref.MUMCPretrain(mods["visual_encoder"], mods["text_encoder"], mods["vision_proj"], mods["text_proj"],
                           mods["itm_head"], momentum, queue(), queue(), s["fusion"])
    sd = {}
    for name, m in list(mods.items()) + [(f"{k}_m", m) for k, m in zip(
            ("visual_encoder", "text_encoder", "vision_proj", "text_proj"), momentum)]:
        for k, v in m.state_dict().items():
            layer = k.split("encoder.layer.")[1].split(".")[0] if "crossattention" in k else None
            if layer is not None and int(layer) < s["fusion"]:
                continue  # xbert has cross-attention only in the fusion layers
            sd[f"{name}.{k}"] = v.clone()
    pos = torch.from_numpy(np.concatenate([np.zeros((1, s["width"]), np.float32),
                                           ref.sincos_2d_posemb(s["width"], grid)]))[None]
    sd["visual_encoder.pos_embed"], sd["visual_encoder_m.pos_embed"] = pos, pos.clone()
    sd["temp"] = net.temp.detach().clone()
    sd["image_queue"], sd["text_queue"] = net.image_queue.clone(), net.text_queue.clone()
    sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return harness.torch_attention(net, sdpa), sd


def _batch_and_draws(s: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    b, n = s["batch"], (s["image"] // s["patch"]) ** 2
    images = rng.standard_normal((b, s["image"], s["image"], 3)).astype(np.float32)
    ids = np.concatenate([np.full((b, 1), 2, np.int32), rng.integers(5, s["vocab"], (b, s["seq"] - 1), dtype=np.int32)], 1)
    mask = np.ones_like(ids)
    mask[1, s["seq"] // 2:] = 0
    ids[mask == 0] = 0
    keep = lambda: np.sort(np.stack([rng.permutation(n)[:int(n * 0.85)] for _ in range(b)]), 1).astype(np.int32)
    picked = (rng.random(ids.shape) < 0.15) & (ids > 4)
    picked[:, 1] = True
    masked = np.where(picked, MASK_ID, ids).astype(np.int32)
    off = lambda: ((np.arange(b) + rng.integers(1, b, b)) % b).astype(np.int32)
    draws = {"keep": keep(), "keep_m": keep(), "masked_ids": masked, "target": picked, "neg_img": off(),
             "neg_txt": off()}
    return {"images": images, "input_ids": ids, "mask": mask}, draws


def _product_step(model, params, momentum, queues, batch, lr: float, wd: float, alpha: float):
    """(step, state, batch) of `jaxboost train configs/mumc_pretrain.py`: its loss, post-update (temperature
    clamp, momentum model, queues) and optimiser, at the reference's lr and decay, alpha at its final value."""
    import types

    from jaxboost.config import load_config
    from jaxboost.train import mumc_pretrain, optim
    from jaxboost.train.state import initial_state
    config = load_config("configs/mumc_pretrain.py:tiny", [f"optim.lr={lr}", f"optim.weight_decay={wd}",
                                                           "optim.schedule=constant", "optim.warmup_steps=0",
                                                           f"alpha={alpha}", "alpha_ramp_epochs=0.0"])
    tx = optim.make_optimizer(config, 1000)
    tokenizer = types.SimpleNamespace(mask_id=MASK_ID, special_ids=SPECIAL, pad_id=SPECIAL[0], cls_id=SPECIAL[1])
    step = mumc_pretrain.make_step_fn(config, model, tx, tokenizer, epoch_steps=1)
    return step, initial_state(params, tx, 0, extra={"momentum": momentum, "queues": queues}), batch


def run(quick: bool = False):
    import torch

    from jaxboost.convert import albef
    from jaxboost.models import mumc
    torch.set_num_threads(max(1, torch.get_num_threads()))
    s = QUICK if quick else FULL
    setting = harness.setting()
    net, sd = _torch_reference(s, setting.torch_sdpa)
    net.to(setting.torch_device).eval()  # no dropout either side (JAX: deterministic=True); autograd still works
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": sd}, f"{d}/checkpoint.pth")
        params, momentum, queues, unmapped = albef.load_albef(f"{d}/checkpoint.pth")
    if unmapped:
        raise AssertionError(f"converter left tensors unmapped: {unmapped[:5]}")
    model = mumc.Model(image_size=s["image"], patch_size=s["patch"], vision_width=s["width"],
                       vision_depth=s["vision_depth"], vision_heads=s["heads"], vision_mlp_dim=4 * s["width"],
                       vocab_size=s["vocab"], text_width=s["width"], text_depth=s["text_depth"],
                       text_heads=s["heads"], text_mlp_dim=s["mlp"], fusion_layer=s["fusion"], max_position=64,
                       embed_dim=s["embed"], dropout_rate=0.0, dtype=setting.jax_dtype, attention_impl="auto")
    batch, draws = _batch_and_draws(s)
    alpha, lr, wd = 0.4, 1e-4, 0.05
    params, momentum, queues = (jax.tree.map(jnp.asarray, t) for t in (params, momentum, queues))
    jbatch, jdraws = jax.tree.map(jnp.asarray, batch), jax.tree.map(jnp.asarray, draws)

    # --- correctness first: the same three losses on the same weights and draws.
    t = lambda x: torch.tensor(np.asarray(x)).long().to(setting.torch_device)
    tb = (torch.tensor(batch["images"].transpose(0, 3, 1, 2)).to(setting.torch_device), t(batch["input_ids"]),
          t(batch["mask"]))
    tdraws = (t(draws["keep"]), t(draws["keep_m"]), t(draws["masked_ids"]),
              t(np.where(draws["target"], batch["input_ids"], -100)), t(draws["neg_img"]),
              t(draws["neg_txt"]))
    queue_state = (net.image_queue.clone(), net.text_queue.clone())
    with torch.no_grad(), setting.autocast():
        ref_losses = [float(x) for x in net(*tb, alpha, *tdraws)]
    net.image_queue.copy_(queue_state[0]), net.text_queue.copy_(queue_state[1]), net.queue_ptr.zero_()
    loss_kw = dict(mask_token_id=MASK_ID, special_token_ids=SPECIAL, deterministic=True)
    # Everything is an argument: closed-over arrays become constants XLA folds (minutes, and out of memory,
    # for the full-size ViT + BERT and the 65536-entry queues).
    _, terms, _ = jax.jit(lambda p, m, q, b, d: mumc.pretrain_losses(model, p, m, q, b, jax.random.PRNGKey(0),
                                                                     alpha, draws=d, **loss_kw))(
        params, momentum, queues, jbatch, jdraws)
    ours = [float(terms[k]) for k in ("mlm", "ita", "itm")]
    err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(ours, ref_losses))
    note = setting.check(f"MUMC losses mlm/ita/itm {ours} vs {ref_losses}", err)

    # --- one training step each: ours is the MUMC trainer's own (masks and draws in-graph from the step rng)
    step, state, device_batch = _product_step(model, params, momentum, queues, jbatch, lr, wd, alpha)
    iters = 5 if quick else 3
    sec, flops = harness.time_product_step(step, state, device_batch, iters=iters)
    b = s["batch"]
    case = f"mumc/pretrain_step {s['image']}px b{b}{setting.tag}"
    rows = [Row(case, "jax", sec, b / sec, flops, harness.mfu(flops, sec),
                note=f"mumc_pretrain train step; losses {note}")]

    def torch_step(model):
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=wd)

        def step():
            opt.zero_grad(set_to_none=True)
            net.momentum_update()
            with setting.autocast():
                l_mlm, l_ita, l_itm = model(*tb, alpha, *tdraws)
            loss = l_mlm.float() + l_ita.float() + l_itm.float()
            loss.backward()
            opt.step()
            return loss
        return step
    sec = harness.time_call(torch_step(net), sync=harness.torch_sync, warmup=2, iters=iters)
    rows.append(Row(case, "torch eager", sec, b / sec))
    if not quick:  # torch.compile takes minutes on a small CPU; --quick leaves it out as the other cases do
        try:
            sec = harness.time_call(torch_step(torch.compile(net)), sync=harness.torch_sync, warmup=2, iters=iters)
            rows.append(Row(case, "torch compile", sec, b / sec))
        except Exception as e:  # noqa: BLE001 — torch.compile needs a working C++ toolchain
            rows.append(Row(case, "torch compile", float("nan"), float("nan"), note=f"failed: {type(e).__name__}"))
    return harness.add_ratios(setting.label(rows))


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
