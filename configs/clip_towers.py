"""Contrastive pretraining of a tiny CLIPSeg's CLIP towers on region/caption pairs (CLIP's objective), so the
CLIPSeg run freezes towers that tell LV, MYO and LA apart, as CLIPSeg freezes a pretrained CLIP.

  jaxboost train --config configs/clip_towers.py:demo --workdir runs/towers --config.data.corpus=CORPUS
  jaxboost train --config configs/clipseg.py:demo --config.pretrained=runs/towers/towers \
    --config.data.tokenizer=runs/towers/tokenizer ...
`demo` is what `jaxboost demo` trains on the scarce real training split before its CLIPSeg runs.
"""
import ml_collections

from jaxboost.config import variant


def get_config(arg=None):
    variant(arg, ("demo",))
    c = ml_collections.ConfigDict()
    c.name = "clip_towers"
    c.trainer = "clip_towers"
    c.segmenter = "configs/clipseg.py:demo"   # whose towers these are (sizes, patch, context length)
    c.data = dict(corpus="",                  # training split: the region/caption pairs
                  background=0.2)             # the image outside the structure is scaled by this
    c.steps = 100
    c.batch_size = 24
    c.lr = 1e-3
    c.weight_decay = 0.1   # CLIP's
    # The vision tower's learned position table starts from the 2-D sin-cos table (MAE; big_vision's ViT
    # default) instead of N(0, 1/width): CLIPSeg's decoder has no position embedding of its own and a random
    # table is a few percent of a token's norm, too little to tell the LV cavity from the LA (or the RV).
    c.posemb_init = "sincos2d"      # or "normal"
    c.seed = 0
    return c
