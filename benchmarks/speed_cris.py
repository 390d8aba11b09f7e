"""CRIS train and inference steps: jaxboost (jit) vs the PyTorch reference that follows CRIS.pytorch
(benchmarks/torch_ref/cris.py; eager and torch.compile), same random weights (through the converter), same
batch, size and loss (Dice + 0.2 BCE on the 1/4-resolution logits, as CRIS trains), AdamW with the backbone
at 0.1x the learning rate, gradient clipping 0.5, BatchNorm in train mode, dropout 0 (so both sides compute
the same thing), on the device and in the precision of `harness.setting()` (the reference's attention through
scaled_dot_product_attention off the float32 CPU default; ours "auto": cuDNN for bf16 on a GPU). The JAX
and torch logits are checked equal first, to the dtype's tolerance.

  python -m benchmarks.speed_cris [--quick] [--profile] [--train-only] [--iters N] [--no-compile] [--conv-impl NAME]

--conv-impl times the model under another `layers.CONV_IMPLS` form (what "auto" runs, layers.AUTO_CONV).
XLA:CPU flag worth trying at full size: XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= (empty: Eigen
convolutions and dots instead of YNNPACK fusions; XLA's own filter gradient of a [2, 52, 52, 512] -> 512
3x3 conv 0.65 s vs 1.5 s, the whole 416 px train step 47.8 s vs 50.9 s in two runs on a loaded 2-core CPU)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness
from benchmarks.harness import Row
from jaxboost.models import layers


def _configs(quick: bool):
    """-> (CLIP kwargs, CRIS kwargs, decoder/text heads, image size, batch, token length)."""
    if quick:
        clip = dict(embed_dim=64, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                    context_length=24, vocab_size=512, transformer_width=64, transformer_heads=4,
                    transformer_layers=2)
        head = dict(fpn_in=(128, 256, 64), fpn_out=(32, 64, 64), num_layers=1, vis_dim=64, num_head=4,
                    dim_ffn=128, word_dim=64)
        return clip, head, dict(num_heads=4, text_heads=4), 96, 4, 24
    clip = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                transformer_layers=12)
    head = dict(fpn_in=(512, 1024, 1024), fpn_out=(256, 512, 1024), num_layers=3, vis_dim=512, num_head=8,
                dim_ffn=2048, word_dim=1024)
    return clip, head, dict(num_heads=8, text_heads=8), 416, 4, 77


def _setup(quick: bool) -> dict:
    """The torch reference with random weights, the same weights converted, one batch on both sides; the
    JAX and torch logits checked equal."""
    import torch

    from benchmarks.torch_ref import cris as ref
    from jaxboost.convert.cris import cris_from_checkpoint

    torch.manual_seed(0)
    setting = harness.setting()
    clip_kw, head_kw, heads, size, batch, seq = _configs(quick)
    tmodel = ref.CRIS(clip_kw, dropout=0.0, **head_kw).eval()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cris.pth"
        torch.save({"state_dict": tmodel.state_dict()}, path)
        module, variables = cris_from_checkpoint(str(path), **heads, dropout_rate=0.0, upsample="none",
                                                 dtype=setting.jax_dtype, attention_impl="auto")
    harness.torch_attention(tmodel, setting.torch_sdpa).to(setting.torch_device)
    rng = np.random.default_rng(0)
    vocab = clip_kw["vocab_size"]
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, vocab - 2, size=(batch, seq)).astype(np.int64)
    ids[:, -1] = vocab - 1
    mask = np.ones_like(ids)
    target = (rng.random((batch, size // 4, size // 4)) > 0.5).astype(np.float32)
    torch_batch = tuple(torch.tensor(a).to(setting.torch_device) for a in (
        np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), ids, mask, target))
    jax_batch = tuple(map(jnp.asarray, (pixels, ids.astype(np.int32), mask.astype(np.int32), target)))
    with torch.no_grad(), setting.autocast():
        ref_logits = tmodel(*torch_batch[:3])[:, 0].float().cpu().numpy()
    apply = jax.jit(module.apply)
    ours = np.asarray(apply(variables, *jax_batch[:3]), np.float32)
    err = float(np.abs(ours - ref_logits).max()) / max(1.0, float(np.abs(ref_logits).max()))
    note = setting.check("CRIS logits", err)
    return dict(tmodel=tmodel, module=module, variables=variables, apply=apply, torch_batch=torch_batch,
                jax_batch=jax_batch, err=err, note=note, size=size, batch=batch, setting=setting)


def run(quick: bool = False, profile: bool = False, train_only: bool = False, compile_torch: bool = True,
        iters: int = 5):
    """Rows; with `profile`, (rows, {"op_profiles": ...}): where each step's time goes in both frameworks.
    `train_only`: the train rows only; `compile_torch=False`: no torch.compile rows (minutes on CPU);
    `iters`: timed calls per row (fewer than 5: one warm-up instead of two; a full-size step takes 10-30 s);
    0 with `profile`: the profiles only (one call each after the warm-up), no timed rows."""
    import torch

    timing = dict(iters=iters, warmup=2 if iters >= 5 else 1)
    s = _setup(quick)
    tmodel, module, variables, apply = s["tmodel"], s["module"], s["variables"], s["apply"]
    (tp, tids, tmask, ttarget), (jp, jids, jmask, jtarget) = s["torch_batch"], s["jax_batch"]
    size, batch, setting = s["size"], s["batch"], s["setting"]
    rows: list[Row] = []
    case_inf, case_train = f"cris/infer {size}px b{batch}{setting.tag}", f"cris/train {size}px b{batch}{setting.tag}"

    def torch_infer(model):
        with torch.no_grad(), setting.autocast():
            return model(tp, tids, tmask)
    if not train_only and iters:
        flops = harness.xla_flops(apply, variables, jp, jids, jmask)
        t = harness.time_call(lambda: apply(variables, jp, jids, jmask), **timing)
        rows.append(Row(case_inf, "jax", t, batch / t, flops, harness.mfu(flops, t), note=s["note"]))
        t = harness.time_call(lambda: torch_infer(tmodel), sync=harness.torch_sync, **timing)
        rows.append(Row(case_inf, "torch eager", t, batch / t))

    # --- train step: the trainer's own; everything trains, the CLIP backbone at 0.1x lr
    lr = 2e-5
    def product_step():
        return harness.vl_seg_step("configs/cris.py:tiny", [f"optim.lr={lr}", "optim.weight_decay=1e-3",
                                                             "optim.grad_clip=0.5", "optim.backbone_lr_mult=0.1",
                                                             "model.freeze_encoders=False"], module, variables,
                                   (jp, jids, jmask, jtarget))
    if iters:
        t, flops = harness.time_product_step(*product_step(), **timing)
        rows.append(Row(case_train, "jax", t, batch / t, flops, harness.mfu(flops, t),
                        note=f"vl_seg train step; conv_impl auto = {layers.choose_conv('auto')}"))

    def make_torch_step(model):
        backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
        head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
        opt = torch.optim.AdamW([{"params": backbone, "lr": lr * 0.1}, {"params": head, "lr": lr}],
                                lr=lr, weight_decay=1e-3)
        every = backbone + head

        return harness.torch_seg_train_step(lambda: (model(tp, tids, tmask)[:, 0], ttarget), every, opt,
                                            setting.autocast)

    tmodel.train()
    if iters:
        t = harness.time_call(make_torch_step(tmodel), sync=harness.torch_sync, **timing)
        rows.append(Row(case_train, "torch eager", t, batch / t))
    if profile:
        n = min(3, iters) or 1
        tmodel.eval()
        profiles = {} if train_only else {case_inf: (harness.xla_op_profile(apply, variables, jp, jids, jmask, iters=n),
                                                     harness.torch_op_profile(lambda: torch_infer(tmodel), iters=n))}
        tmodel.train()
        step_fn, state, device_batch = product_step()  # time_product_step donated the first state
        profiles[case_train] = (harness.xla_op_profile(jax.jit(step_fn), state, device_batch, iters=n),
                                harness.torch_op_profile(make_torch_step(tmodel), iters=n))
        return harness.add_ratios(setting.label(rows)), {"op_profiles": {
            case: {"jax": j, "torch eager": t, "table": harness.format_op_profiles(case, j, t)}
            for case, (j, t) in profiles.items()}}
    if quick or not compile_torch:  # torch.compile of CRIS takes minutes on a small CPU: the full run measures it
        rows.append(Row(case_train, "torch compile", float("nan"), float("nan"),
                        note="skipped in --quick" if quick else "skipped (--no-compile)"))
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


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", action="store_true", help="op-level profiles of both frameworks' steps")
    parser.add_argument("--train-only", action="store_true", help="the train step only")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile rows")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per row")
    parser.add_argument("--conv-impl", choices=layers.CONV_IMPLS.names(), default=None,
                        help="what the model's conv_impl 'auto' runs on this backend (layers.AUTO_CONV)")
    args = parser.parse_args()
    if args.conv_impl:
        layers.AUTO_CONV[jax.default_backend()] = args.conv_impl
    out = run(quick=args.quick, profile=args.profile, train_only=args.train_only, compile_torch=not args.no_compile,
              iters=args.iters)
    rows, extra = out if isinstance(out, tuple) else (out, {})
    print(harness.format_table(harness.add_ratios(rows)))
    for p in extra.get("op_profiles", {}).values():
        print("\n" + p["table"])
