"""Semantic diffusion model (SDM, Wang et al. 2022, as echo_from_noise trains it): mask-conditioned U-Net,
MSE + lambda * VLB.

  jaxboost train --config configs/sdm.py:tiny --workdir runs/sdm --config.data.corpus=CORPUS
`demo` is tiny as `jaxboost demo` trains it (fewer steps, no sample grid).
`full` is echo_from_noise's SDM (256 px, width 256, cosine, 1000 steps, lambda 0.001, cfg dropout 0.2, guidance 1.5):
652,198,918 parameters (jax.eval_shape of init; the torch reference counts the same).
`full_16` is `full` for 16 chips of 16 GB (TPU v4/v5e): every parameter split over fsdp=16 and each step's
batch of 96 run as 2 accumulated micro-batches of 48 (3 per chip; README's Scale section has the memory rows).
`echo_from_noise` is the model behind the 9,000 synthetic CAMUS images, with the flags of that repository's
semantic_diffusion_model/config.py and README: the new attention order (USE_NEW_ATTENTION_ORDER=True), 64
channels per head, no label dropout (so no guidance), lr 1e-4 annealed linearly to 0 over lr_anneal_steps
(50,000) and ancestral DDPM over all 1000 steps at sampling; batch 12 per GPU on 8 GPUs. Its checkpoints
convert with `jaxboost convert sdm --config configs/sdm.py:echo_from_noise`.
"""
import ml_collections

from jaxboost.config import variant


def get_config(arg=None):
    v = variant(arg, ("tiny", "demo", "full", "full_16", "echo_from_noise"))
    tiny = v in ("tiny", "demo")
    c = ml_collections.ConfigDict()
    c.name = "sdm"
    c.trainer = "sdm"
    c.model_name = "sdm"
    # tiny: 64 px like the demo's other corpora; ~2 min of CPU for a few hundred steps at batch 8.
    size, labels = (64, 5) if tiny else (256, 5)  # labels: 4 CAMUS classes + the cone
    c.model = dict(
        image_size=size, in_channels=1 if tiny else 3, model_channels=32 if tiny else 256,
        channel_mult=(1, 2, 2) if tiny else (1, 1, 2, 2, 4, 4), num_res_blocks=1 if tiny else 2,
        attention_resolutions=(16,) if tiny else (32, 16, 8), num_head_channels=32 if tiny else 64,
        num_labels=labels, learn_sigma=True, dropout=0.0, use_scale_shift_norm=True, resblock_updown=True,
        # full: remat keeps each block's inputs only (9.6 GiB of saved activations per sample without it)
        dtype="float32" if tiny else "bfloat16", remat_policy="none" if tiny else "full",
        spade_hidden=32 if tiny else 128,  # SPADE's 128-wide convs would be ~60% of the tiny model's FLOPs
        conv_impl="auto")  # layers.CONV_IMPLS: on CPU large convs' filter gradients as matmuls, else XLA's
    c.diffusion = dict(schedule="cosine", num_steps=1000, vlb_weight=0.001, cond_drop_prob=0.2)
    c.sampler = dict(name="ddim", steps=25 if tiny else 50, eta=0.0, guidance=1.5, dtype="float32")
    c.data = dict(corpus="", size=size, num_labels=labels,
                  workers=0 if tiny else 8, prefetch=2,  # grain worker processes; batches each keeps ready
                  host_uint8=True)  # uint8 from the host, labels and normalisation inside the step
    c.seed = 0
    c.batch_size = 8 if tiny else 96
    c.microbatches = 1  # >1: the batch's gradient accumulated over this many micro-batches (same update)
    c.total_steps = 300 if tiny else 100_000
    c.optim = dict(name="adamw", lr=1e-4 if not tiny else 3e-4, weight_decay=0.0, grad_clip=1.0 if tiny else 0.0,
                   schedule="constant", warmup_steps=0)  # upstream does not clip (0 = off)
    c.ema_decay = 0.99 if tiny else 0.9999  # tiny: a few hundred steps only
    c.log_every = 25 if tiny else 100
    c.eval_every = 100 if tiny else 5000   # sample a PNG grid for fixed masks
    c.ckpt_every = 100 if tiny else 5000
    c.mesh = dict(data=-1, fsdp=1)
    c.compilation_cache_dir = ""  # persistent XLA cache (local or gs://); "": $JAX_COMPILATION_CACHE_DIR
    c.profile_steps = ""  # "A,B": a jax.profiler trace of steps A..B in the workdir (TensorBoard profile)
    c.init_from = ""  # a run folder or a `jaxboost convert sdm` folder: start from its params and EMA params
    if v == "echo_from_noise":
        _echo_from_noise(c)
    if v == "demo":
        _demo(c)
    if v == "full_16":
        c.microbatches = 2
        c.mesh = dict(data=-1, fsdp=16)
    return c


def _demo(c):
    """What `jaxboost demo` trains on the scarce real images: tiny for 120 steps (at its 100-step checkpoint
    the tiny SDM already drew its masks at U-Net Dice 80-82, README's SDM label fidelity table), no sample
    grid (the demo draws its own from the synthetic corpus) and one checkpoint, at the end."""
    c.total_steps = 120
    c.eval_every = 0
    c.ckpt_every = 120


def _echo_from_noise(c):
    c.model.update(use_new_attention_order=True, num_head_channels=64, num_heads=1, num_heads_upsample=-1)
    c.diffusion.update(schedule="cosine", num_steps=1000, vlb_weight=0.001, cond_drop_prob=0.0)
    # guidance None (one conditional pass), still overridable with --config.sampler.guidance=1.5
    c.sampler = dict(name="ddpm", steps=1000, eta=0.0, guidance=ml_collections.config_dict.placeholder(float),
                     dtype="float32")
    c.batch_size = 96  # 12 per GPU x 8
    c.total_steps = 50_000  # guided-diffusion stops at lr_anneal_steps
    c.optim.update(name="adamw", lr=1e-4, weight_decay=0.0, grad_clip=0.0, schedule="linear_to_zero")
    c.ema_decay = 0.9999
