"""MUMC VQA finetuning and evaluation (Li et al. 2023): answer decoder ranking top-k candidates.

  jaxboost train --config configs/mumc_vqa.py:tiny --workdir runs/mumc_vqa --config.data.root=ECHO_VQA \
      --config.init_from=runs/mumc_pt
`protocol="fixed"` (default): candidates from training answers, strict match, selection on validation.
`protocol="original"`: the public answer list (with test answers) and the lenient evaluator, for comparison.
"""
import ml_collections

from jaxboost.config import variant

TINY_MODEL = dict(image_size=32, pretrain_image_size=32, patch_size=4, vision_width=64, vision_depth=2,
                  vision_heads=4, vision_mlp_dim=128, text_width=64, text_depth=4, text_heads=4,
                  text_mlp_dim=128, fusion_layer=2, decoder_depth=2, max_position=32, vocab_size=0)
FULL_MODEL = dict(image_size=384, pretrain_image_size=256, patch_size=16, vision_width=768, vision_depth=12,
                  vision_heads=12, vision_mlp_dim=3072, text_width=768, text_depth=12, text_heads=12,
                  text_mlp_dim=3072, fusion_layer=6, decoder_depth=6, max_position=512, vocab_size=30522,
                  remat="full")


def get_config(arg=None):
    v = variant(arg, ("tiny", "full"))
    tiny = v == "tiny"
    c = ml_collections.ConfigDict()
    c.name = "mumc_vqa"
    c.trainer = "mumc_vqa"
    c.model_name = "mumc"
    c.model = dict(TINY_MODEL if tiny else FULL_MODEL, dropout_rate=0.0 if tiny else 0.1,
                   dtype="float32" if tiny else "bfloat16",
                   attention_impl="auto")  # per backend: cuDNN flash on GPU, Pallas flash on TPU, einsum on CPU
    c.data = dict(root="", image_dir="images", size=c.model.image_size, val_fraction=0.1,
                  # MUMC: "[CLS] question" (no [SEP]) cut at 25 tokens; answers untruncated (0: the longest)
                  max_question_tokens=25, max_answer_tokens=0, tokenizer="",
                  # MUMC's VQA training view; tiny (32 px, a few hundred steps) trains on the plain image
                  augment=not tiny, crop_scale=(0.5, 1.0), flip=True, randaugment=(2, 7),
                  augment_at="host",  # "host": MUMC's PIL order; "device": crop and flip in the step
                  host_uint8=True)  # uint8 views from the host, normalised inside the step
    c.protocol = "fixed"             # "fixed" | "original"
    c.top_k = 16 if tiny else 128    # candidates kept by first-token probability, re-ranked by likelihood
    c.momentum = 0.995
    c.teacher_dropout = True         # MUMC's momentum model runs in train mode (dropout on)
    c.alpha = 0.4
    c.seed = 0
    c.batch_size = 16 if tiny else 8 * 8
    c.epochs = 10 if tiny else 40
    c.total_steps = 200 if tiny else 0
    # full: MUMC's cosine set once per epoch with its 1e-8 floor; tiny keeps the per-step cosine.
    c.optim = dict(name="adamw", lr=1e-4 if tiny else 2e-5, weight_decay=0.05,
                   schedule="cosine" if tiny else "mumc_epoch_cosine", min_lr=1e-8, warmup_steps=0)
    # a pretraining run (or a `convert albef` folder): answer decoder from its text layers 6-11, momentum
    # model from its momentum encoders; or a VQA run (a `convert albef --target vqa` folder), loaded as it is
    c.init_from = ""
    c.best_metric = "val/overall"
    c.best_mode = "max"
    c.log_every = 20 if tiny else 100
    c.eval_every = 100 if tiny else 1000
    c.ckpt_every = 100 if tiny else 1000
    c.mesh = dict(data=-1, fsdp=1)
    c.compilation_cache_dir = ""  # persistent XLA cache (local or gs://); "": $JAX_COMPILATION_CACHE_DIR
    c.profile_steps = ""  # "A,B": a jax.profiler trace of steps A..B in the workdir (TensorBoard profile)
    return c
