"""CLIPSeg train and inference steps: jaxboost (jit) vs HF `CLIPSegForImageSegmentation` (eager and
torch.compile), same random weights (through the converter), same batch, size and loss (Dice + BCE,
decoder trained, encoders frozen as in HF), on the device and in the precision of `harness.setting()` (HF's
"sdpa" attention; ours "auto": cuDNN for bf16 on a GPU). The JAX and torch logits are checked equal first,
to the dtype's tolerance."""
from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.harness import Row


def _configs(quick: bool):
    from transformers import CLIPSegConfig
    if quick:
        text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=16, bos_token_id=510, eos_token_id=511)
        vision = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                      image_size=64, patch_size=16)
        cfg = CLIPSegConfig(text_config=text, vision_config=vision, projection_dim=64, extract_layers=[1, 2, 3],
                            reduce_dim=32, decoder_num_attention_heads=4, decoder_intermediate_size=128,
                            use_complex_transposed_convolution=True)
        return cfg, 96, 4, 16
    cfg = CLIPSegConfig(text_config=dict(vocab_size=49408), vision_config=dict(image_size=224, patch_size=16),
                        projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64,
                        use_complex_transposed_convolution=True)
    return cfg, 352, 4, 20


def run(quick: bool = False):
    import torch
    from transformers import CLIPSegForImageSegmentation

    from jaxboost.convert.hf_clipseg import clipseg_from_hf

    torch.manual_seed(0)
    setting = harness.setting()
    cfg, size, batch, seq = _configs(quick)
    cfg._attn_implementation = "sdpa"  # what HF picks by default here; said so the rows never depend on it
    tmodel = CLIPSegForImageSegmentation(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        tmodel.save_pretrained(d)
        module, variables = clipseg_from_hf(d, dtype=setting.jax_dtype, attention_impl="auto")
    tmodel.to(setting.torch_device)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, cfg.text_config.vocab_size - 1, size=(batch, seq)).astype(np.int64)
    ids[:, -1] = cfg.text_config.vocab_size - 1
    mask = np.ones_like(ids)
    target = (rng.random((batch, size, size)) > 0.5).astype(np.float32)

    on_device = lambda a: torch.tensor(a).to(setting.torch_device)
    tp, tids, tmask = on_device(pixels).permute(0, 3, 1, 2), on_device(ids), on_device(mask)
    ttarget = on_device(target)
    jp, jids, jmask, jtarget = map(jnp.asarray, (pixels, ids.astype(np.int32), mask.astype(np.int32), target))

    # --- correctness first: a benchmark of two different computations would be meaningless.
    def torch_infer(model):
        with torch.no_grad(), setting.autocast():
            return model(pixel_values=tp, input_ids=tids, attention_mask=tmask).logits
    ref = torch_infer(tmodel).float().cpu().numpy()
    apply = jax.jit(module.apply)
    ours = np.asarray(apply(variables, jp, jids, jmask), np.float32)
    # relative to max |logit|: HF's random init gives logits in the hundreds
    err = float(np.abs(ours - ref.reshape(ours.shape)).max()) / max(1.0, float(np.abs(ref).max()))
    note = setting.check("CLIPSeg logits", err)

    rows: list[Row] = []
    case_inf, case_train = (f"clipseg/{kind} {size}px b{batch}{setting.tag}" for kind in ("infer", "train"))
    flops = harness.xla_flops(apply, variables, jp, jids, jmask)
    t = harness.time_call(lambda: apply(variables, jp, jids, jmask))
    rows.append(Row(case_inf, "jax", t, batch / t, flops, harness.mfu(flops, t), note=note))
    t = harness.time_call(lambda: torch_infer(tmodel), sync=harness.torch_sync)
    rows.append(Row(case_inf, "torch eager", t, batch / t))

    # --- train step: the trainer's own (vl_seg: Dice + BCE, encoders frozen as in HF, AdamW, clipping)
    step = harness.vl_seg_step("configs/clipseg.py:tiny", ["optim.lr=2e-3", "optim.weight_decay=1e-3",
                                                             "optim.grad_clip=0.5"], module, variables,
                               (jp, jids, jmask, jtarget))
    t, flops = harness.time_product_step(*step)
    rows.append(Row(case_train, "jax", t, batch / t, flops, harness.mfu(flops, t), note="vl_seg train step"))

    def make_torch_step(model):
        dec_params = [p for n, p in model.named_parameters() if not n.startswith("clip.")]
        opt = torch.optim.AdamW(dec_params, lr=2e-3, weight_decay=1e-3)

        return harness.torch_seg_train_step(
            lambda: (model(pixel_values=tp, input_ids=tids, attention_mask=tmask).logits, ttarget), dec_params, opt,
            setting.autocast)

    tmodel.train()
    t = harness.time_call(make_torch_step(tmodel), sync=harness.torch_sync)
    rows.append(Row(case_train, "torch eager", t, batch / t))
    if quick:  # torch.compile's C++ build takes minutes on 2 cores; the full run measures it
        return setting.label(rows)
    try:
        compiled = torch.compile(tmodel)
        t = harness.time_call(lambda: torch_infer(compiled.eval()), sync=harness.torch_sync, warmup=2)
        rows.append(Row(case_inf, "torch compile", t, batch / t))
        t = harness.time_call(make_torch_step(compiled.train()), sync=harness.torch_sync, warmup=2)
        rows.append(Row(case_train, "torch compile", t, batch / t))
    except Exception as e:  # noqa: BLE001 — torch.compile needs a working C++ toolchain
        rows.append(Row(case_train, "torch compile", float("nan"), float("nan"), note=f"failed: {type(e).__name__}"))
    return setting.label(rows)
