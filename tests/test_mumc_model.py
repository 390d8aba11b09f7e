"""MUMC model parity: an ALBEF/MUMC-layout torch checkpoint (reference ViT + HF BERT layers + heads), converted,
must give the same image/text features, fused states, ITM and MLM logits; the VQA decoder init must copy
encoder layers fusion.. ; momentum/queue helpers do what MUMC's buffers do."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from benchmarks.torch_ref import mumc as ref
from jaxboost.convert import albef
from jaxboost.losses import mlm
from jaxboost.models import mumc

W, FUSION, DEPTH, VOCAB, E = 32, 2, 4, 61, 16
SIZES = dict(image_size=32, patch_size=8, vision_width=W, vision_depth=2, vision_heads=4, vision_mlp_dim=128,
             vocab_size=VOCAB, text_width=W, text_depth=DEPTH, text_heads=4, text_mlp_dim=48,
             fusion_layer=FUSION, max_position=32, embed_dim=E)


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith("bias") or "norm" in n.lower():
                p.add_(scale * torch.randn_like(p))


@pytest.fixture(scope="module")
def torch_mumc(tmp_path_factory):
    """A MUMC pretraining checkpoint with random weights, and the torch modules that made it."""
    torch.manual_seed(0)
    mods = {
        "visual_encoder": ref.VisionTransformer(img_size=32, patch_size=8, embed_dim=W, depth=2, num_heads=4),
        "text_encoder": transformers.BertLMHeadModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=W, num_hidden_layers=DEPTH, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=32, is_decoder=True, add_cross_attention=True,
            attn_implementation="eager")),
        "vision_proj": nn.Linear(W, E), "text_proj": nn.Linear(W, E), "itm_head": ref.build_itm_head(W)}
    for m in mods.values():
        _perturb(m)
        m.eval()
    sd = {}
    for name, m in mods.items():
        for k, v in m.state_dict().items():
            if "crossattention" in k and int(k.split("encoder.layer.")[1].split(".")[0]) < FUSION:
                continue  # xbert has cross-attention only in the fusion layers
            sd[f"{name}.{k}"] = v.clone()
            if name != "itm_head":  # momentum copies, deliberately different
                sd[f"{name}_m.{k}"] = v.clone() + 0.01
    sd["visual_encoder.pos_embed"] = torch.from_numpy(
        np.concatenate([np.zeros((1, W), np.float32), ref.sincos_2d_posemb(W, 4)]))[None]
    sd["visual_encoder_m.pos_embed"] = sd["visual_encoder.pos_embed"].clone()
    sd["temp"] = torch.tensor(0.07)
    sd["image_queue"], sd["text_queue"] = torch.randn(E, 8), torch.randn(E, 8)
    sd["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    path = tmp_path_factory.mktemp("albef") / "checkpoint.pth"
    torch.save({"model": sd, "epoch": 3}, path)
    return mods, sd, str(path)


@pytest.fixture(scope="module")
def converted(torch_mumc):
    return albef.load_albef(torch_mumc[2])


def test_albef_converter_maps_every_tensor(torch_mumc, converted):
    params, momentum, queues, unmapped = converted
    assert all(k.endswith(("position_ids", "token_type_ids")) for k in unmapped), unmapped
    ref_params = jax.eval_shape(mumc.Model(**SIZES).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32))["params"]
    shapes = lambda t: jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), t)
    assert shapes(params) == shapes(ref_params)
    assert shapes(momentum) == shapes({k: ref_params[k] for k in mumc.MOMENTUM_KEYS})
    np.testing.assert_allclose(queues["image"], torch_mumc[1]["image_queue"].numpy().T)
    np.testing.assert_allclose(momentum["vision_proj"]["bias"], torch_mumc[1]["vision_proj_m.bias"].numpy())


def test_albef_converter_names_missing_tensor(torch_mumc, tmp_path):
    sd = {k: v for k, v in torch_mumc[1].items() if k != "text_encoder.bert.encoder.layer.3.output.dense.bias"}
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"text_encoder\.bert\.encoder\.layer\.3\.output\.dense\.bias"):
        albef.load_albef(str(tmp_path / "broken.pth"))


@pytest.mark.parametrize("drop", [False, True])
def test_mumc_vit_matches_torch_reference_with_patch_dropping(torch_mumc, converted, drop):
    mods, _, _ = torch_mumc
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    keep = np.sort(np.stack([rng.permutation(16)[:13] for _ in range(2)]), axis=1) if drop else None
    t_img = torch.tensor(images.transpose(0, 3, 1, 2))
    t_keep = torch.tensor(keep) if drop else None
    with torch.no_grad():
        want_tokens = mods["visual_encoder"](t_img, t_keep)
        want_feat = ref.F.normalize(mods["vision_proj"](want_tokens[:, 0]), dim=-1)
    model = mumc.Model(**SIZES)
    params = converted[0]
    tokens, feat = model.apply({"params": params}, jnp.asarray(images), None if keep is None else jnp.asarray(keep),
                               method=model.encode_image)
    np.testing.assert_allclose(tokens, want_tokens.numpy(), atol=1e-4)
    np.testing.assert_allclose(feat, want_feat.numpy(), atol=1e-4)


def test_mumc_vit_gradients_match_torch_reference(torch_mumc, converted):
    mods, _, _ = torch_mumc
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
    w = rng.standard_normal((2, 17, W)).astype(np.float32)
    vit_t = mods["visual_encoder"]
    vit_t.zero_grad()
    (vit_t(torch.tensor(images.transpose(0, 3, 1, 2))) * torch.tensor(w)).sum().backward()
    model = mumc.Model(**SIZES)
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, jnp.asarray(images),
                                                   method=model.encode_image)[0] * w))(converted[0])
    g = grads["vision"]
    np.testing.assert_allclose(g["patch_embed"]["kernel"],
                               vit_t.patch_embed.proj.weight.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)
    np.testing.assert_allclose(g["block0"]["attn"]["key"]["kernel"],
                               vit_t.blocks[0].attn.qkv.weight.grad.numpy()[W:2 * W].T, atol=1e-4)


def test_mumc_text_fusion_itm_mlm_match_torch(torch_mumc, converted):
    mods, _, _ = torch_mumc
    rng = np.random.default_rng(2)
    images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(4, VOCAB, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0
    bert_t = mods["text_encoder"].bert
    with torch.no_grad():
        img_t = mods["visual_encoder"](torch.tensor(images.transpose(0, 3, 1, 2)))
        text_t = ref.bert_text_fusion(bert_t, torch.tensor(ids), torch.tensor(mask), None, FUSION, "text")
        feat_t = ref.F.normalize(mods["text_proj"](text_t[:, 0]), dim=-1)
        fused_t = ref.bert_text_fusion(bert_t, torch.tensor(ids), torch.tensor(mask), img_t, FUSION)
        itm_t = mods["itm_head"](fused_t[:, 0])
        mlm_t = mods["text_encoder"].cls(fused_t)
    model = mumc.Model(**SIZES)
    v = {"params": converted[0]}
    tokens, _ = model.apply(v, jnp.asarray(images), method=model.encode_image)
    hidden, feat = model.apply(v, jnp.asarray(ids), jnp.asarray(mask), method=model.encode_text)
    fused = model.apply(v, hidden, jnp.asarray(mask), tokens, method=model.fuse)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[valid], text_t.numpy()[valid], atol=1e-4)
    np.testing.assert_allclose(feat, feat_t.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.asarray(fused)[valid], fused_t.numpy()[valid], atol=1e-4)
    np.testing.assert_allclose(model.apply(v, fused[:, 0], method=model.itm_logits), itm_t.numpy(), atol=1e-4)
    mlm = model.apply(v, fused, method=model.mlm_logits)
    np.testing.assert_allclose(np.asarray(mlm)[valid], mlm_t.numpy()[valid], atol=1e-4)


def test_answer_decoder_init_copies_encoder_fusion_layers(torch_mumc, converted):
    sd = torch_mumc[1]
    vqa = mumc.vqa_params_from_pretrain(converted[0], pretrain_grid=4, first_layer=FUSION,
                                        decoder_depth=DEPTH - FUSION)
    dec = vqa["decoder"]
    t = lambda k: sd["text_encoder." + k].numpy()
    for i in range(DEPTH - FUSION):
        src = f"bert.encoder.layer.{FUSION + i}."
        layer = dec[f"layer{i}"]
        np.testing.assert_array_equal(layer["attention"]["query"]["kernel"], t(src + "attention.self.query.weight").T)
        np.testing.assert_array_equal(layer["crossattention"]["value"]["kernel"],
                                      t(src + "crossattention.self.value.weight").T)
        np.testing.assert_array_equal(layer["crossattention_ln"]["scale"],
                                      t(src + "crossattention.output.LayerNorm.weight"))
        np.testing.assert_array_equal(layer["output"]["bias"], t(src + "output.dense.bias"))
    np.testing.assert_array_equal(dec["embeddings"]["word_embeddings"]["embedding"],
                                  t("bert.embeddings.word_embeddings.weight"))
    np.testing.assert_array_equal(dec["mlm_bias"], t("cls.predictions.bias"))
    assert "mlm_bias" not in vqa["text"] and set(dec) == {"embeddings", "mlm_transform", "mlm_ln", "mlm_bias",
                                                          "layer0", "layer1"}


def test_vqa_vit_interpolates_position_table_like_mumc(torch_mumc, converted):
    """At a larger VQA resolution the stored 4x4 sin-cos table is resized bicubically (interpolate_pos_embed)."""
    mods, _, _ = torch_mumc
    vqa = mumc.vqa_params_from_pretrain(converted[0], pretrain_grid=4, first_layer=FUSION,
                                        decoder_depth=DEPTH - FUSION)
    model = mumc.VQAModel(**dict(SIZES, image_size=48), pretrain_image_size=32, decoder_depth=DEPTH - FUSION)
    images = np.random.default_rng(3).standard_normal((2, 48, 48, 3)).astype(np.float32)
    got = model.apply({"params": vqa}, jnp.asarray(images), deterministic=True,
                      method=lambda m, x, deterministic: m.vision(x, deterministic=deterministic))
    pos = ref.interpolate_patch_pos(torch.from_numpy(ref.sincos_2d_posemb(W, 4)), 6)
    with torch.no_grad():
        want = mods["visual_encoder"](torch.tensor(images.transpose(0, 3, 1, 2)), patch_pos=pos)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_momentum_update_is_ema_and_enqueue_wraps():
    params = {"vision": {"w": jnp.full((2,), 1.0)}, "vision_proj": {"w": jnp.zeros(1)},
              "text": {"w": jnp.zeros(1)}, "text_proj": {"w": jnp.zeros(1)}, "temp": jnp.asarray(0.07)}
    mom = mumc.momentum_init(params)
    assert "temp" not in mom
    mom = dict(mom, vision={"w": jnp.full((2,), 3.0)})
    new = mumc.momentum_update(params, mom, 0.995)
    np.testing.assert_allclose(new["vision"]["w"], 0.995 * 3.0 + 0.005 * 1.0, rtol=1e-6)

    q = mumc.init_queues(jax.random.PRNGKey(0), 6, 4)
    np.testing.assert_allclose(jnp.linalg.norm(q["image"], axis=-1), 1.0, rtol=1e-5)
    feats = [jnp.full((2, 4), float(i)) for i in range(4)]
    for f in feats:
        q = mumc.enqueue(q, f, -f)
    assert int(q["ptr"]) == 2  # 4 writes of 2 into 6 slots wrap once
    np.testing.assert_array_equal(q["image"][:, 0], [3, 3, 1, 1, 2, 2])
    np.testing.assert_array_equal(q["text"][:2, 0], [-3, -3])
    with pytest.raises(ValueError, match="multiple of the global batch"):
        mumc.enqueue(q, jnp.zeros((4, 4)), jnp.zeros((4, 4)))


@pytest.mark.slow
def test_pretrain_losses_match_torch_mumc_step_and_shard_over_global_batch(torch_mumc, converted):
    """The whole MUMC pretraining loss (MLM + ITA + ITM, momentum distillation, queues) equals MUMC's
    forward in torch for the same weights and random choices, values and gradients; the same jitted
    function on a batch sharded over 8 devices gives the same loss (negatives span the global batch)."""
    import copy
    from jax.sharding import NamedSharding, PartitionSpec as P
    mods, sd, _ = torch_mumc
    momentum_mods = []
    for name in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
        m = copy.deepcopy(mods[name])
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01)
        momentum_mods.append(m)
    net = ref.MUMCPretrain(mods["visual_encoder"], mods["text_encoder"], mods["vision_proj"], mods["text_proj"],
                           mods["itm_head"], momentum_mods, sd["image_queue"], sd["text_queue"], FUSION)
    net.zero_grad()
    b = 8
    rng = np.random.default_rng(4)
    images = rng.standard_normal((b, 32, 32, 3)).astype(np.float32)
    ids = np.concatenate([np.ones((b, 1), np.int32), rng.integers(5, VOCAB, (b, 6), dtype=np.int32)], 1)
    mask = np.ones((b, 7), np.int32)
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    keep = lambda: np.sort(np.stack([rng.permutation(16)[:13] for _ in range(b)]), axis=1).astype(np.int32)
    masked, target = (np.asarray(x) for x in mlm.mask_tokens(jax.random.PRNGKey(7), jnp.asarray(ids), VOCAB, 3,
                                                              (0, 1, 2), 0.3))
    draws = {"keep": keep(), "keep_m": keep(), "masked_ids": masked, "target": target,
             "neg_img": ((np.arange(b) + rng.integers(1, b, b)) % b).astype(np.int32),
             "neg_txt": ((np.arange(b) + rng.integers(1, b, b)) % b).astype(np.int32)}
    alpha = 0.4
    t = lambda x: torch.tensor(np.asarray(x)).long()
    l_mlm, l_ita, l_itm = net(torch.tensor(images.transpose(0, 3, 1, 2)), t(ids), t(mask), alpha, t(draws["keep"]),
                              t(draws["keep_m"]), t(masked), torch.tensor(np.where(target, ids, -100)).long(),
                              t(draws["neg_img"]), t(draws["neg_txt"]))
    (l_mlm + l_ita + l_itm).backward()

    model = mumc.Model(**SIZES)
    params, momentum, queues, _ = converted
    batch = {"images": images, "input_ids": ids, "mask": mask}
    fn = jax.jit(lambda p, bt, dr: mumc.pretrain_losses(model, p, momentum, queues, bt, jax.random.PRNGKey(0),
                                                        alpha, mask_token_id=3, special_token_ids=(0, 1, 2),
                                                        deterministic=True, draws=dr))
    (total, (terms, feats)), grads = jax.value_and_grad(
        lambda p: (lambda tot, te, f: (tot, (te, f)))(*fn(p, batch, draws)), has_aux=True)(params)
    for k, want in (("mlm", l_mlm), ("ita", l_ita), ("itm", l_itm)):
        np.testing.assert_allclose(float(terms[k]), want.item(), rtol=1e-4, atol=1e-5, err_msg=k)
    close = lambda ours, theirs: np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-4, rtol=1e-3)
    close(grads["temp"], net.temp.grad)
    close(grads["itm_fc2"]["kernel"].T, mods["itm_head"][3].weight.grad)
    close(grads["text_proj"]["kernel"].T, mods["text_proj"].weight.grad)
    close(grads["text"]["layer3"]["crossattention"]["key"]["kernel"].T,
          mods["text_encoder"].bert.encoder.layer[3].crossattention.self.key.weight.grad)
    close(grads["vision"]["patch_embed"]["kernel"],
          mods["visual_encoder"].patch_embed.proj.weight.grad.permute(2, 3, 1, 0))
    new_queues = mumc.enqueue(queues, *feats)
    np.testing.assert_allclose(new_queues["image"].T, net.image_queue.numpy(), atol=1e-5)

    # Auto axes: XLA (GSPMD) places the gathers; with Explicit axes the embedding lookup needs out_sharding.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    total_s, terms_s, (fi_s, _) = fn(params, sharded, draws)
    np.testing.assert_allclose(float(total_s), float(total), rtol=1e-5)
    assert fi_s.shape == (b, E)


@pytest.mark.slow   # 14-29 s on the shared 2-core machine (two jitted losses and two torch forwards)
def test_mlm_teacher_reads_the_ema_step_taken_after_the_momentum_features(torch_mumc, converted):
    """MUMC's order (models/model.py): momentum features, then _momentum_update, then the MLM teacher on the
    EMA'd text encoder. The torch reference doing that EMA inside its forward gives our losses with
    `teacher_params` = the EMA'd tree, and the tree we keep equals its updated momentum modules."""
    import copy
    mods, sd, _ = torch_mumc
    mods = {k: copy.deepcopy(v) for k, v in mods.items()}
    momentum_mods = []
    for name in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
        m = copy.deepcopy(mods[name])
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.1)   # far enough from the online model for the EMA step to show in the MLM loss
        momentum_mods.append(m)
    net = ref.MUMCPretrain(mods["visual_encoder"], mods["text_encoder"], mods["vision_proj"], mods["text_proj"],
                           mods["itm_head"], momentum_mods, sd["image_queue"], sd["text_queue"], FUSION,
                           momentum=0.5, ema_in_forward=True)
    b, rng = 4, np.random.default_rng(5)
    images = rng.standard_normal((b, 32, 32, 3)).astype(np.float32)
    ids = np.concatenate([np.ones((b, 1), np.int32), rng.integers(5, VOCAB, (b, 6), dtype=np.int32)], 1)
    mask = np.ones((b, 7), np.int32)
    masked, target = (np.asarray(x) for x in mlm.mask_tokens(jax.random.PRNGKey(8), jnp.asarray(ids), VOCAB, 3,
                                                              (0, 1), 0.4))
    draws = {"keep": np.tile(np.arange(13, dtype=np.int32), (b, 1)),
             "keep_m": np.tile(np.arange(3, 16, dtype=np.int32), (b, 1)),
             "masked_ids": masked, "target": target, "neg_img": np.roll(np.arange(b), 1).astype(np.int32),
             "neg_txt": np.roll(np.arange(b), 2).astype(np.int32)}
    t = lambda x: torch.tensor(np.asarray(x)).long()
    args = (torch.tensor(images.transpose(0, 3, 1, 2)), t(ids), t(mask), 0.4, t(draws["keep"]), t(draws["keep_m"]),
            t(masked), torch.tensor(np.where(target, ids, -100)).long(), t(draws["neg_img"]), t(draws["neg_txt"]))
    with torch.no_grad():
        net.ema_in_forward = False
        l_mlm_pre_ema, l_ita, _ = net(*args)   # ITA reads the pre-EMA features either way
        net.ema_in_forward = True
        l_mlm = net(*args)[0]                  # (the first call's queue write changes only ITA)
    params, momentum, queues, _ = converted
    momentum = jax.tree_util.tree_map(lambda x: x + 0.09, momentum)   # the checkpoint's copies are online + 0.01
    after = mumc.momentum_update(params, momentum, 0.5)
    losses = jax.jit(lambda teacher: mumc.pretrain_losses(
        mumc.Model(**SIZES), params, momentum, queues, {"images": images, "input_ids": ids, "mask": mask},
        jax.random.PRNGKey(0), 0.4, mask_token_id=3, special_token_ids=(0, 1), deterministic=True, draws=draws,
        teacher_params=teacher)[1])
    terms, terms_pre_ema = losses(after), losses(momentum)
    np.testing.assert_allclose(float(terms["mlm"]), l_mlm.item(), rtol=1e-4, atol=1e-5)
    # The EMA step moves the MLM loss by ~1e-4 here (near-uniform logits): compare the moves themselves.
    move, move_ref = float(terms["mlm"] - terms_pre_ema["mlm"]), (l_mlm - l_mlm_pre_ema).item()
    assert abs(move_ref) > 5e-5, move_ref
    np.testing.assert_allclose(move, move_ref, rtol=0.05)
    np.testing.assert_allclose(float(terms["ita"]), l_ita.item(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(after["text_proj"]["bias"], net.text_proj_m.bias.numpy(), atol=1e-6)


@pytest.mark.parametrize("name,cls", [("mumc_pretrain", mumc.Model), ("mumc_vqa", mumc.VQAModel)])
@pytest.mark.parametrize("v", ["tiny", "full"])
def test_mumc_configs_build_their_models(name, cls, v):
    from jaxboost.config import load_config
    from jaxboost.registry import model_class
    c = load_config(f"configs/{name}.py:{v}")
    assert c.model_name == "mumc" and model_class(c.model_name) is mumc.Model and c.trainer == name
    fields = dict(c.model, vocab_size=c.model.vocab_size or 100, dtype=None)
    size = fields["image_size"]
    args = [jnp.zeros((1, size, size, 3)), jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5), jnp.int32)]
    if cls is mumc.VQAModel:
        args += [jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 3), jnp.int32)]
    shapes = jax.eval_shape(cls(**fields).init, jax.random.PRNGKey(0), *args)["params"]
    n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    if v == "full" and cls is mumc.Model:
        assert 200e6 < n < 240e6, n   # ViT-B/16 (86M) + BERT-base with 6 cross-attention layers (~137M)


def test_rank_answers_matches_mumc_rank_answer(tmp_path):
    from jaxboost.convert import bert as convert_bert
    torch.manual_seed(3)
    hf = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=W, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, is_decoder=True, add_cross_attention=True, attn_implementation="eager"))
    _perturb(hf, 0.3)
    hf.eval()
    hf.save_pretrained(tmp_path)
    _, dec, _ = convert_bert.load_hf_bert(str(tmp_path))
    rng = np.random.default_rng(5)
    q_states = rng.standard_normal((3, 5, W)).astype(np.float32)
    q_mask = np.ones((3, 5), np.int64)
    q_mask[1, 3:] = 0
    answers = np.zeros((6, 5), np.int64)           # [CLS]=2 a.. [SEP]=3 [PAD]=0, distinct first tokens
    lengths = [1, 2, 3, 1, 2, 3]
    for i, n in enumerate(lengths):
        answers[i, :n + 2] = [2, *(10 + i + 7 * np.arange(n)), 3]
    a_mask = (answers != 0).astype(np.int64)
    with torch.no_grad():
        want_ids, want_scores = ref.rank_answer(hf, torch.tensor(q_states), torch.tensor(q_mask),
                                                torch.tensor(answers), torch.tensor(a_mask), 4, 0)
    model = mumc.VQAModel(**dict(SIZES, text_depth=4), decoder_depth=2, dropout_rate=0.0)
    got_ids, got_scores = mumc.rank_answers(model, {"decoder": dec}, jnp.asarray(q_states), jnp.asarray(q_mask),
                                            jnp.asarray(answers), jnp.asarray(a_mask), 4)
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    np.testing.assert_allclose(got_scores, want_scores.numpy(), atol=1e-5)


def test_keep_indices_follow_mae_count_and_clamp_projects_temperature():
    keep = mumc.keep_indices(jax.random.PRNGKey(0), 3, 256, 0.15)
    assert keep.shape == (3, 217) and all(len(set(np.asarray(k))) == 217 for k in keep)
    assert np.all(np.diff(np.asarray(keep), axis=1) > 0)
    params = {"temp": jnp.asarray(0.0001), "vision": {}}
    assert float(mumc.clamp_params(params)["temp"]) == pytest.approx(0.001)
    assert float(mumc.clamp_params({"temp": jnp.asarray(0.9)})["temp"]) == pytest.approx(0.5)


def test_overlay_hf_bert_keeps_fresh_cross_attention_and_names_mismatch():
    base = {"text": {"layer0": {"attention": {"kernel": jnp.zeros((2, 2))}},
                     "layer1": {"attention": {"kernel": jnp.zeros((2, 2))}, "crossattention": {"kernel": jnp.ones(3)}}},
            "temp": jnp.asarray(0.07)}
    loaded = {"text": {"layer0": {"attention": {"kernel": np.full((2, 2), 5.0)}},
                       "layer1": {"attention": {"kernel": np.full((2, 2), 6.0)}}}}
    merged, kept = mumc.overlay_params(base, loaded)
    assert float(merged["text"]["layer1"]["attention"]["kernel"][0, 0]) == 6.0
    assert sorted(kept) == ["/temp", "/text/layer1/crossattention"]
    with pytest.raises(ValueError, match=r"/text/layer0/attention/kernel: loaded shape \(3,\)"):
        mumc.overlay_params(base, {"text": {"layer0": {"attention": {"kernel": np.zeros(3)}}}})


def test_vqa_loss_matches_torch_decoder_built_from_encoder_layers(torch_mumc, converted):
    """VQA: question fused with the image by all encoder layers, answer decoder = HF BertLMHeadModel loaded
    (in torch) with encoder layers FUSION.. + embeddings + MLM head; MUMC's distilled LM loss; same value."""
    mods, sd, _ = torch_mumc
    n_dec = DEPTH - FUSION
    dec_t = transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=W, num_hidden_layers=n_dec, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, is_decoder=True, add_cross_attention=True, attn_implementation="eager"))
    state = {}
    for k in dec_t.state_dict():
        src = k
        if ".encoder.layer." in k:
            i = int(k.split(".encoder.layer.")[1].split(".")[0])
            src = k.replace(f".encoder.layer.{i}.", f".encoder.layer.{i + FUSION}.")
        state[k] = sd["text_encoder." + src]
    dec_t.load_state_dict(state)
    dec_t.eval()
    rng = np.random.default_rng(6)
    images = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)
    q = rng.integers(5, VOCAB, (3, 6))
    q[:, 0] = 1
    qm = np.ones((3, 6), np.int64)
    qm[0, 4:] = 0
    a = np.array([[1, 11, 3, 0], [1, 12, 13, 3], [1, 14, 3, 0]])
    am = (a != 0).astype(np.int64)
    with torch.no_grad():
        img = mods["visual_encoder"](torch.tensor(images.transpose(0, 3, 1, 2)))
        states = ref.bert_text_fusion(mods["text_encoder"].bert, torch.tensor(q), torch.tensor(qm), img, FUSION)
        logits = dec_t(torch.tensor(a), attention_mask=torch.tensor(am), encoder_hidden_states=states,
                       encoder_attention_mask=torch.tensor(qm)).logits
        labels = torch.tensor(np.where(a == 0, -100, a))
        want = ref.answer_lm_loss(logits, logits[:, :-1], labels, 0.4).sum() / 3
    model = mumc.VQAModel(**SIZES, pretrain_image_size=32, decoder_depth=n_dec)
    params = mumc.vqa_params_from_pretrain(converted[0], pretrain_grid=4, first_layer=FUSION, decoder_depth=n_dec)
    batch = {"images": images, "question_ids": q, "question_mask": qm, "answer_ids": a, "answer_mask": am}
    loss, per_q = mumc.vqa_loss(model, params, params, batch, jax.random.PRNGKey(0), 0.4, deterministic=True)
    np.testing.assert_allclose(float(loss), want.item(), rtol=1e-4)
    assert per_q.shape == (3,)
