"""Small U-Net multi-class segmenter on the echo phantom corpus: the trainer skeleton's proof.

  jaxboost train --config configs/unet_phantom.py:tiny --workdir runs/unet --config.data.corpus=CORPUS
"""
import ml_collections

from jaxboost.config import variant


def get_config(arg=None):
    v = variant(arg, ("tiny", "full"))
    c = ml_collections.ConfigDict()
    c.name = "unet_phantom"
    c.trainer = "unet_seg"
    c.model_name = "unet"
    c.model = dict(num_classes=4, widths=(16, 32, 64) if v == "tiny" else (32, 64, 128, 256))
    c.data = dict(corpus="", size=64 if v == "tiny" else 256,
                  host_uint8=True)  # uint8 from the host, normalised inside the step
    c.seed = 0
    c.batch_size = 8 if v == "tiny" else 32
    c.total_steps = 150 if v == "tiny" else 20_000
    c.optim = dict(name="adamw", lr=3e-3 if v == "tiny" else 1e-3, weight_decay=1e-4, grad_clip=1.0,
                   schedule="cosine", warmup_steps=10 if v == "tiny" else 500)
    c.log_every = 25 if v == "tiny" else 100
    c.eval_every = 75 if v == "tiny" else 1000
    c.ckpt_every = 75 if v == "tiny" else 1000
    c.best_metric = "val/dice_mean"
    c.mesh = dict(data=-1, fsdp=1)
    c.compilation_cache_dir = ""  # persistent XLA cache (local or gs://); "": $JAX_COMPILATION_CACHE_DIR
    c.profile_steps = ""  # "A,B": a jax.profiler trace of steps A..B in the workdir (TensorBoard profile)
    return c
