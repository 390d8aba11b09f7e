"""MUMC's starting-point files written in their own formats from the torch references and HF, tiny and
random: an HF BERT folder (save_pretrained + vocab.txt), an MAE file ({"model": encoder + decoder}, its
sin-cos pos_embed at its own grid) and an ALBEF.pth-style file (learned pos_embed, single-Linear itm_head,
momentum copies +0.01, queues)."""
from pathlib import Path

import torch
import transformers

from benchmarks.torch_ref import mumc as ref
from jaxboost.models import mumc

W, DEPTH, FUSION, PATCH, EMBED, QUEUE = 64, 4, 2, 4, 32, 8
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "left", "ventricle", "heart", "of", "wall", "##s", "."]
# configs/mumc_pretrain.py:tiny at these sizes
MODEL = ["model.patch_size=4", "model.vision_width=64", "model.vision_depth=2", "model.vision_heads=4",
         "model.vision_mlp_dim=128", "model.text_width=64", "model.text_depth=4", "model.text_heads=4",
         "model.text_mlp_dim=128", "model.fusion_layer=2", "model.max_position=32", "model.embed_dim=32",
         "queue_size=8", "batch_size=8"]


def _bert_config(**kw):
    return transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=W, num_hidden_layers=DEPTH,
                                   num_attention_heads=4, intermediate_size=128, max_position_embeddings=32, **kw)


def write_bert(folder: Path) -> dict:
    torch.manual_seed(0)
    bert = transformers.BertModel(_bert_config())
    bert.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return bert.state_dict()


def write_mae(path: Path, grid: int) -> dict:
    torch.manual_seed(1)
    vit = ref.VisionTransformer(img_size=grid * PATCH, patch_size=PATCH, embed_dim=W, depth=2, num_heads=4,
                                mlp_ratio=2.0)
    sd = {k: v.clone() for k, v in vit.state_dict().items()}
    sd["pos_embed"] = torch.from_numpy(mumc.sincos_table(grid, W))[None]
    sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, W)})
    torch.save({"model": sd}, path)
    return sd


def write_albef(path: Path, grid: int, with_queues: bool = True) -> dict:
    torch.manual_seed(2)
    vit = ref.VisionTransformer(img_size=grid * PATCH, patch_size=PATCH, embed_dim=W, depth=2, num_heads=4,
                                mlp_ratio=2.0)
    sd = {f"visual_encoder.{k}": v.clone() for k, v in vit.state_dict().items()}
    sd["visual_encoder.pos_embed"] = torch.randn(1, 1 + grid * grid, W) * 0.02
    lm = transformers.BertForMaskedLM(_bert_config(is_decoder=True, add_cross_attention=True))
    for k, v in lm.state_dict().items():
        if "crossattention" in k and int(k.split("encoder.layer.")[1].split(".")[0]) < FUSION:
            continue
        sd[f"text_encoder.{k}"] = v
    sd.update({"vision_proj.weight": torch.randn(EMBED, W), "vision_proj.bias": torch.randn(EMBED),
               "text_proj.weight": torch.randn(EMBED, W), "text_proj.bias": torch.randn(EMBED),
               "temp": torch.tensor(0.05), "itm_head.weight": torch.randn(2, W), "itm_head.bias": torch.zeros(2)})
    for k in [k for k in sd if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj", "text_proj"))]:
        head, rest = k.split(".", 1)
        sd[f"{head}_m.{rest}"] = sd[k] + 0.01
    if with_queues:
        sd["image_queue"], sd["text_queue"] = torch.randn(EMBED, QUEUE), torch.randn(EMBED, QUEUE)
        sd["queue_ptr"] = torch.tensor([4])
    torch.save({"model": sd, "epoch": 29}, path)
    return sd


def write_vqa(path: Path, grid: int, decoder_depth: int = 2) -> dict:
    """A finetuned MUMC/ALBEF VQA checkpoint: ViT with its learned table, BertModel text encoder (cross-attention
    from FUSION on), answer decoder `text_decoder.{bert,cls}` (BertLMHeadModel, cross-attention everywhere)."""
    torch.manual_seed(3)
    vit = ref.VisionTransformer(img_size=grid * PATCH, patch_size=PATCH, embed_dim=W, depth=2, num_heads=4,
                                mlp_ratio=2.0)
    sd = {f"visual_encoder.{k}": v.clone() for k, v in vit.state_dict().items()}
    sd["visual_encoder.pos_embed"] = torch.randn(1, 1 + grid * grid, W) * 0.02
    text = transformers.BertModel(_bert_config(add_cross_attention=True, is_decoder=True), add_pooling_layer=False)
    for k, v in text.state_dict().items():
        if "crossattention" in k and int(k.split("encoder.layer.")[1].split(".")[0]) < FUSION:
            continue
        sd[f"text_encoder.{k}"] = v
    dec_config = _bert_config(add_cross_attention=True, is_decoder=True)
    dec_config.num_hidden_layers = decoder_depth
    for k, v in transformers.BertLMHeadModel(dec_config).state_dict().items():
        sd[f"text_decoder.{k}"] = v
    torch.save({"model": sd}, path)
    return sd
