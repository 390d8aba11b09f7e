"""MUMC pretraining (Li et al. 2023): MLM + ITA (with unimodal terms) + ITM, momentum distillation, queues.

  jaxboost train --config configs/mumc_pretrain.py:tiny --workdir runs/mumc_pt --config.data.corpus=CORPUS
`tiny`: phantom corpus captions (P6/P7), 32 px (4 px patches: 8x8 tokens), two-layer towers, queue 16, WordPiece
trained on the corpus; lr 1e-3 decayed every 50 steps, momentum 0.99, crops of at least half the image, no RandAugment.
600 steps on a 6-patient corpus: i2t 3.39 -> 1.19, itm 0.66 -> 0.50, mlm 4.36 -> 2.01 (first vs last 75 steps) vs
3.48 -> 2.71, 0.67 -> 0.63, 4.80 -> 3.67 with the full config's 3e-4, 0.995, 20% crops and RandAugment (2, 7).
`full`: MUMC's settings (ViT-B/16 at 256 px, BERT-base, queue 65,536, AdamW 3e-4 wd 0.05, 30 epochs, 32/GPU,
warm-up 3000 steps then 3e-4 * 0.9^epoch, alpha 0.4 ramped over 2 epochs) on ROCO/MedICaT/ImageCLEF json.
"""
import ml_collections

from jaxboost.config import variant

TINY_MODEL = dict(image_size=32, patch_size=4, vision_width=64, vision_depth=2, vision_heads=4,
                  vision_mlp_dim=128, text_width=64, text_depth=4, text_heads=4, text_mlp_dim=128,
                  fusion_layer=2, max_position=32, embed_dim=32, vocab_size=0)  # vocab: the trained tokenizer
FULL_MODEL = dict(image_size=256, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
                  vision_mlp_dim=3072, text_width=768, text_depth=12, text_heads=12, text_mlp_dim=3072,
                  fusion_layer=6, max_position=512, embed_dim=256, vocab_size=30522, remat="full")


def get_config(arg=None):
    v = variant(arg, ("tiny", "full"))
    tiny = v == "tiny"
    c = ml_collections.ConfigDict()
    c.name = "mumc_pretrain"
    c.trainer = "mumc_pretrain"
    c.model_name = "mumc"
    c.model = dict(TINY_MODEL if tiny else FULL_MODEL, temp_init=0.07, dropout_rate=0.0 if tiny else 0.1,
                   dtype="float32" if tiny else "bfloat16",
                   attention_impl="auto",  # per backend: cuDNN flash on GPU, Pallas flash on TPU, einsum on CPU
                   vision_posemb="sincos2d")  # "table": a frozen stored table (set it to start from ALBEF.pth)
    # The paper's starting point (MUMC models/model.py), local paths; empty = fresh init. `bert`: an HF
    # bert-base-uncased folder (its vocab.txt is the tokenizer unless data.tokenizer is set); `mae`: MAE's
    # ViT-B/16 file; `albef`: ALBEF.pth (or a MUMC checkpoint, or a pretraining run), loaded over both (needs
    # model.vision_posemb="table"). Each may also be the folder `jaxboost convert bert|mae|albef` wrote;
    # position tables at another grid are resized as MUMC's interpolate_pos_embed.
    c.init = dict(bert="", mae="", albef="")
    c.data = dict(
        workers=0 if tiny else 8, prefetch=2,  # grain worker processes; batches each keeps ready
        host_uint8=True,  # uint8 views from the host, normalised inside the step
        corpus="",                        # triplet corpus -> captions from P6/P7 (one corpus for both methods); or caption json:
        caption_files=(), image_roots=(),  # ROCO / MedICaT / ImageCLEF lists of {image, caption}
        size=c.model.image_size, max_words=30, max_tokens=25,
        tokenizer="",                     # local folder or vocab.txt; empty: train WordPiece into workdir
        tokenizer_vocab_size=1000 if tiny else 30522,
        one_per_image=False,              # corpus: one record (the LV one) per image instead of three
        highlight_structure=True,         # corpus: tint the caption's structure into the image (its subject)
        augment=True,                     # random resized crop, flip, RandAugment (per-record rng)
        augment_at="host",  # "host": MUMC's PIL order; "device": crop and flip in the step (caption_augment)
        # tiny: a 20% crop of a 32 px image often cuts the highlighted structure (the caption's subject) away,
        # and RandAugment at magnitude 7 held ITM at its prior for 600 steps (0.64 -> 0.50 without it).
        crop_scale=(0.5, 1.0) if tiny else (0.2, 1.0), flip=True, randaugment=() if tiny else (2, 7))
    # tiny: one batch. On a corpus of a few hundred images a longer queue keeps the positives' own images as
    # negatives and collapses the image features (measured on the phantom; MUMC's 65,536 is for ~100k images).
    c.queue_size = 16 if tiny else 65_536
    # tiny: a run of hundreds of steps; at 0.995 the momentum model (the targets) lags by ~200 steps.
    c.momentum = 0.99 if tiny else 0.995
    c.teacher_dropout = True                  # MUMC's momentum teachers run in train mode (dropout on)
    c.alpha = 0.4
    c.alpha_ramp_epochs = 2.0
    c.patch_drop = 0.15
    c.mlm_probability = 0.15
    c.seed = 0
    c.batch_size = 16 if tiny else 32 * 8     # global batch (32 per GPU on 8 GPUs)
    c.epochs = 4 if tiny else 30
    c.total_steps = 200 if tiny else 0        # full: set from epochs * steps_per_epoch by the trainer
    # full: MUMC's schedule (warm-up from 1e-6, the 0.9^epoch decay counted from step 0); tiny keeps its own.
    c.optim = dict(name="adamw", lr=1e-3 if tiny else 3e-4, weight_decay=0.05, grad_clip=0.0,
                   schedule="warmup_epoch_decay" if tiny else "mumc_epoch_decay", warmup_steps=20 if tiny else 3000,
                   warmup_lr=1e-5 if tiny else 1e-6,
                   epoch_decay=0.9,
                   epoch_steps=50 if tiny else 0)  # an epoch of the decay and the alpha ramp; 0: the data's
    c.log_every = 20 if tiny else 100
    c.ckpt_every = 100 if tiny else 5000
    c.eval_every = 0                          # steps between held-out evaluations; 0 = none during training
    c.mesh = dict(data=-1, fsdp=1)
    c.compilation_cache_dir = ""  # persistent XLA cache (local or gs://); "": $JAX_COMPILATION_CACHE_DIR
    c.profile_steps = ""  # "A,B": a jax.profiler trace of steps A..B in the workdir (TensorBoard profile)
    return c
