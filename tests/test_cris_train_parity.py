"""CRIS training as jaxboost runs it vs the PyTorch baseline (benchmarks/time_to_dice.py): what one train
step does beyond the forward and gradients (tests/test_cris.py) must be torch's too: the BatchNorm running
statistics a train-mode forward leaves (they are what evaluation reads) and the optimiser's update (AdamW
with the backbone at backbone_lr_mult x lr, weight decay on every parameter, global-norm clipping)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from benchmarks import time_to_dice  # noqa: E402
from benchmarks.torch_ref import cris as ref  # noqa: E402
from jaxboost.config import load_config  # noqa: E402
from jaxboost.convert.cris import variables_from_state_dicts  # noqa: E402
from jaxboost.models import clip, cris  # noqa: E402
from jaxboost.train import optim, vl_seg  # noqa: E402

CLIP_KW = dict(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=8, context_length=8,
               vocab_size=40, transformer_width=16, transformer_heads=2, transformer_layers=1)
CRIS_KW = dict(fpn_in=(64, 128, 32), fpn_out=(8, 16, 32), num_layers=1, vis_dim=16, num_head=2, dim_ffn=24,
               word_dim=32, dropout=0.0)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def test_cris_running_variances_are_torchs_unbiased_ones(one_torch_thread):
    """torch's BatchNorm keeps the unbiased batch variance (n / (n - 1)); flax's nn.BatchNorm the biased one,
    8/7 smaller for the text gate's BatchNorm1d over a batch of 8, so a jaxboost-trained CRIS evaluated
    with other statistics than the same training in PyTorch."""
    torch.manual_seed(0)
    model = ref.CRIS(CLIP_KW, **CRIS_KW).train()
    variables = variables_from_state_dicts({k: v.numpy().copy() for k, v in model.state_dict().items()}, None)[0]
    module = cris.Model(stage_sizes=(1, 1, 1, 1), vision_width=8, embed_dim=32, vision_image_size=64,
                        vocab_size=40, text_width=16, text_depth=1, text_heads=2, context_length=8,
                        fpn_out=(8, 16, 32), num_layers=1, num_heads=2, mlp_dim=24, dropout_rate=0.0,
                        upsample="none")
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(8, 3, 64, 64)).astype(np.float32)
    ids = rng.integers(1, 39, size=(8, 8))
    ids[:, -1] = 39
    with torch.no_grad():
        model(torch.tensor(pixels), torch.tensor(ids), torch.ones(8, 8, dtype=torch.long))
    _, updates = module.apply(variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids),
                              jnp.ones((8, 8), jnp.int32), train=True, mutable=["batch_stats"])
    theirs = _flat(variables_from_state_dicts({k: v.numpy() for k, v in model.state_dict().items()},
                                              None)[0]["batch_stats"])
    ours = _flat(jax.device_get(updates["batch_stats"]))
    assert ours.keys() == theirs.keys()
    for name in ours:  # neck/txt_proj_bn/var: over the batch of 8; visual/attnpool/connect/bn/var: 8 x 2 x 2
        np.testing.assert_allclose(ours[name], theirs[name], rtol=2e-5, atol=2e-6, err_msg=name)


def test_batch_norm_is_torchs_in_training_and_evaluation(rng):
    x = rng.normal(size=(4, 3, 5, 6)).astype(np.float32) * 3 + 1
    bn = torch.nn.BatchNorm2d(6).train()
    with torch.no_grad():
        bn.weight.normal_(1, 0.2)
        bn.bias.normal_()
        expected = bn(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    params = {"scale": bn.weight.detach().numpy(), "bias": bn.bias.detach().numpy()}
    stats = {"mean": np.zeros(6, np.float32), "var": np.ones(6, np.float32)}
    y, updates = clip.BatchNorm(False).apply({"params": params, "batch_stats": stats}, jnp.asarray(x),
                                             mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
    for ours, theirs in zip((updates["batch_stats"]["mean"], updates["batch_stats"]["var"]),
                            (bn.running_mean, bn.running_var)):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-6)
    bn.eval()
    with torch.no_grad():
        expected = bn(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    y = clip.BatchNorm(True).apply({"params": params, "batch_stats": updates["batch_stats"]}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)


def test_vl_seg_cris_optimizer_is_the_baselines_torch_adamw(one_torch_thread):
    """The same gradients through jaxboost's CRIS optimiser (optim.make_optimizer with vl_seg's groups) and
    the baseline's torch AdamW param groups + clip_grad_norm_ + the lr schedule: the same parameters, step
    after step."""
    config = load_config("cris.py:demo")
    config.optim.backbone_lr_mult = 0.1   # CRIS's two lr groups (the demo trains both at the full lr)
    frozen, lr_mults = vl_seg.encoder_groups(config)
    tx = optim.make_optimizer(config, 100, 10, frozen=frozen, lr_mults=lr_mults)
    rng = np.random.default_rng(0)
    shapes = {"visual/stem1/conv/kernel": (3, 3, 3, 4), "text/ln_final/scale": (6,), "neck/txt_proj/kernel": (6, 5),
              "proj/vis_out/bias": (5,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    backbone = [p for k, p in tparams.items() if k.startswith(("visual/", "text/"))]
    head = [p for k, p in tparams.items() if not k.startswith(("visual/", "text/"))]
    lr = float(config.optim.lr)
    opt = torch.optim.AdamW([{"params": backbone, "lr": lr * float(config.optim.backbone_lr_mult)},
                             {"params": head, "lr": lr}], lr=lr, weight_decay=float(config.optim.weight_decay))
    lr_scale = time_to_dice.torch_lr_schedule(opt, config, 100, 10)   # the demo's warm-up + cosine
    ours = traverse_util.unflatten_dict(params, sep="/")
    state = tx.init(ours)
    update = jax.jit(tx.update)
    for step in range(6):
        grads = {k: (rng.normal(size=s) * (10.0 if step % 2 else 0.05)).astype(np.float32)  # clipped and not
                 for k, s in shapes.items()}
        updates, state = update(traverse_util.unflatten_dict(grads, sep="/"), state, ours)
        ours = jax.tree.map(lambda p, u: p + u, ours, updates)
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        torch.nn.utils.clip_grad_norm_(list(tparams.values()), float(config.optim.grad_clip))
        opt.step()
        lr_scale.step()
        for k, p in _flat(jax.device_get(ours)).items():
            np.testing.assert_allclose(p, tparams[k].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{k} at {step}")
