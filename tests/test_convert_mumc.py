"""MUMC's starting point (MUMC models/model.py): an HF BERT folder, an MAE ViT file and ALBEF.pth, each written
here in its own format, load into the pretraining state with every tensor equal to its source (the step from
them: tests/test_convert_mumc_folders.py)."""
import numpy as np
import pytest
import torch
import transformers

from benchmarks.torch_ref import mumc as ref
from jaxboost.config import load_config
from jaxboost.models import mumc
from jaxboost.train import mumc_pretrain

W, DEPTH, FUSION, VOCAB_WORDS = 64, 4, 2, ["the", "left", "ventricle", "heart", "of", "wall", "##s", "."]
MODEL = ["model.image_size=32", "model.patch_size=4", "model.vision_width=64", "model.vision_depth=2",
         "model.vision_heads=4", "model.vision_mlp_dim=128", "model.text_width=64", "model.text_depth=4",
         "model.text_heads=4", "model.text_mlp_dim=128", "model.fusion_layer=2", "model.max_position=32",
         "model.embed_dim=32", "queue_size=8", "batch_size=4"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """bert/ (BertModel.save_pretrained + vocab.txt), mae.pth ({"model": MAE encoder + decoder}), albef.pth."""
    root = tmp_path_factory.mktemp("mumc_start")
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *VOCAB_WORDS]
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32))
    bert.save_pretrained(root / "bert")
    (root / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    vit = ref.VisionTransformer(img_size=32, patch_size=4, embed_dim=W, depth=2, num_heads=4, mlp_ratio=2.0)
    mae_sd = {k: v.clone() for k, v in vit.state_dict().items()}
    mae_sd["pos_embed"] = torch.from_numpy(mumc.sincos_table(8, W))[None]
    mae_sd.update({"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, W)})
    torch.save({"model": mae_sd}, root / "mae.pth")
    return root, bert.state_dict(), mae_sd


@pytest.fixture(scope="module")
def albef_file(sources):
    """ALBEF.pth-style: learned pos_embed, single-Linear itm_head, momentum copies (+0.01) and queues."""
    root, bert_sd, mae_sd = sources
    sd = {f"visual_encoder.{k}": v for k, v in mae_sd.items() if not k.startswith(("decoder", "mask"))}
    sd["visual_encoder.pos_embed"] = torch.randn(1, 65, W) * 0.02
    lm = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=len(VOCAB_WORDS) + 5, hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, is_decoder=True, add_cross_attention=True))
    for k, v in lm.state_dict().items():
        if "crossattention" in k and int(k.split("encoder.layer.")[1].split(".")[0]) < FUSION:
            continue
        sd[f"text_encoder.{k}"] = v
    sd.update({"vision_proj.weight": torch.randn(32, W), "vision_proj.bias": torch.randn(32),
               "text_proj.weight": torch.randn(32, W), "text_proj.bias": torch.randn(32),
               "temp": torch.tensor(0.05), "itm_head.weight": torch.randn(2, W), "itm_head.bias": torch.zeros(2)})
    for k in [k for k in sd if k.startswith(("visual_encoder.", "text_encoder.", "vision_proj", "text_proj"))]:
        head, rest = k.split(".", 1)
        sd[f"{head}_m.{rest}"] = sd[k] + 0.01
    sd["image_queue"], sd["text_queue"] = torch.randn(32, 8), torch.randn(32, 8)
    sd["queue_ptr"] = torch.tensor([4])
    torch.save({"model": sd, "epoch": 29}, root / "albef.pth")
    return root / "albef.pth", sd


def _config(*extra):
    return load_config("configs/mumc_pretrain.py:tiny", [*MODEL, *extra])


def _init(config, tmp_path):
    tokenizer = mumc_pretrain.get_tokenizer(config, tmp_path)
    model = mumc_pretrain.build_model(config, tokenizer.vocab_size)
    tx = mumc_pretrain.make_optimizer(config, 10, 5, frozen=mumc_pretrain.frozen_params(config))
    return tokenizer, model, tx, mumc_pretrain.make_init_fn(config, model, tx)(mumc_pretrain.starting_point(config))


def _t(x):
    return x.detach().numpy()


def test_bert_and_mae_start_copy_every_source_tensor(sources, tmp_path):
    root, bert_sd, mae_sd = sources
    config = _config(f"init.bert={root / 'bert'}", f"init.mae={root / 'mae.pth'}")
    tokenizer, _, _, state = _init(config, tmp_path)
    assert tokenizer.vocab_size == len(VOCAB_WORDS) + 5 and tokenizer.token_id("ventricle") == 7
    text, vision = state.params["text"], state.params["vision"]
    np.testing.assert_array_equal(text["embeddings"]["word_embeddings"]["embedding"],
                                  _t(bert_sd["embeddings.word_embeddings.weight"]))
    np.testing.assert_array_equal(text["layer3"]["intermediate"]["kernel"],
                                  _t(bert_sd["encoder.layer.3.intermediate.dense.weight"]).T)
    np.testing.assert_array_equal(text["layer1"]["attention_ln"]["scale"],
                                  _t(bert_sd["encoder.layer.1.attention.output.LayerNorm.weight"]))
    np.testing.assert_array_equal(vision["block1"]["mlp"]["fc2"]["kernel"], _t(mae_sd["blocks.1.mlp.fc2.weight"]).T)
    np.testing.assert_array_equal(vision["cls_token"], _t(mae_sd["cls_token"]).reshape(-1))
    qkv = _t(mae_sd["blocks.0.attn.qkv.weight"])
    np.testing.assert_array_equal(vision["block0"]["attn"]["value"]["kernel"], qkv[2 * W:].T)
    # MUMC's copy_params: the momentum model starts equal to the loaded online one.
    np.testing.assert_array_equal(state.extra["momentum"]["vision"]["block1"]["mlp"]["fc2"]["kernel"],
                                  vision["block1"]["mlp"]["fc2"]["kernel"])


def test_albef_start_copies_learned_table_momentum_and_queues(sources, albef_file, tmp_path):
    root, _, _ = sources
    path, sd = albef_file
    config = _config(f"init.bert={root / 'bert'}", f"init.albef={path}", "model.vision_posemb=table")
    _, _, _, state = _init(config, tmp_path)
    np.testing.assert_array_equal(state.params["vision"]["pos_embedding"], _t(sd["visual_encoder.pos_embed"])[0])
    np.testing.assert_array_equal(state.extra["momentum"]["vision"]["pos_embedding"],
                                  _t(sd["visual_encoder_m.pos_embed"])[0])
    np.testing.assert_allclose(state.extra["momentum"]["text_proj"]["bias"], _t(sd["text_proj_m.bias"]))
    np.testing.assert_allclose(state.params["temp"], 0.05)
    np.testing.assert_array_equal(state.extra["queues"]["image"], _t(sd["image_queue"]).T)
    assert int(state.extra["queues"]["ptr"]) == 4
    # ALBEF's single-Linear itm_head has no place in MUMC's two-layer head: that head keeps its fresh init.
    assert state.params["itm_fc1"]["kernel"].shape == (W, 2 * W)


def test_albef_learned_table_without_table_model_is_refused(sources, albef_file, tmp_path):
    config = _config(f"init.bert={sources[0] / 'bert'}", f"init.albef={albef_file[0]}")
    with pytest.raises(ValueError, match="vision_posemb='table'"):
        _init(config, tmp_path)
