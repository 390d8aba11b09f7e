"""VQA / caption readers: bad input gets a clear message, answers are normalised, protocols differ as named;
echo-VQA is built from a triplet corpus in the VQA-RAD format and reads back."""
import json
import warnings

import numpy as np
import pytest

from jaxboost.data import captions, vqa


def _item(i, **kw):
    base = {"qid": i, "image_name": f"img{i % 3}.png", "question": "q?", "answer": "Yes",
            "answer_type": "CLOSED", "question_type": "pres"}
    return {**base, **kw}


def _write(root, name, obj):
    (root / name).write_text(json.dumps(obj))
    return root / name


def test_normalize_answer_lowercases_strips_punctuation_and_xray():
    assert vqa.normalize_answer("  X-Ray, Chest. ") == "xray chest"
    assert vqa.normalize_answer("Left  Lung!") == "left lung"
    assert vqa.normalize_answer("x-ray") == vqa.normalize_answer("xray") == "xray"


def test_missing_field_error_names_field_and_index(tmp_path):
    items = [_item(0), _item(1)]
    del items[1]["answer_type"]
    path = _write(tmp_path, "trainset.json", items)
    with pytest.raises(ValueError, match=r"trainset\.json: item 1 is missing field 'answer_type'"):
        vqa.read_vqa_json(path, tmp_path / "images")


def test_bad_answer_type_is_named(tmp_path):
    path = _write(tmp_path, "testset.json", [_item(0, answer_type="maybe")])
    with pytest.raises(ValueError, match=r"item 0 field 'answer_type'"):
        vqa.read_vqa_json(path, tmp_path)


@pytest.mark.parametrize("name", ["../secret.png", "/etc/passwd", "a/../../b.png"])
def test_image_path_escaping_dataset_folder_is_refused(tmp_path, name):
    path = _write(tmp_path, "trainset.json", [_item(0, image_name=name)])
    with pytest.raises(ValueError, match="escapes the dataset folder"):
        vqa.read_vqa_json(path, tmp_path / "images")


def test_validation_carved_from_train_by_image_when_absent(tmp_path):
    _write(tmp_path, "trainset.json", [_item(i, image_name=f"img{i // 2}.png") for i in range(40)])
    _write(tmp_path, "testset.json", [_item(0)])
    train = vqa.load_vqa(tmp_path, "train", val_fraction=0.2)
    val = vqa.load_vqa(tmp_path, "val", val_fraction=0.2)
    assert len(train) + len(val) == 40 and len(val) == 8
    assert not {it.image_path for it in train} & {it.image_path for it in val}
    assert [it.qid for it in vqa.load_vqa(tmp_path, "val", val_fraction=0.2)] == [it.qid for it in val]


def test_strict_vs_lenient_match_and_accuracy_by_type():
    assert not vqa.strict_match("lung", "left lung") and vqa.lenient_match("lung", "left lung")
    assert vqa.strict_match("X-ray", "xray") and not vqa.lenient_match("", "xray")
    items = [vqa.VQAItem("0", None, "q", "left lung", "OPEN", "organ"),
             vqa.VQAItem("1", None, "q", "yes", "CLOSED", "organ"), vqa.VQAItem("2", None, "q", "no", "CLOSED")]
    preds = ["lung", "Yes.", "yes"]
    fixed = vqa.accuracy(preds, items, "fixed")
    original = vqa.accuracy(preds, items, "original")
    assert (fixed["overall"], fixed["open"], fixed["closed"]) == (1 / 3, 0.0, 0.5)
    assert (fixed["type/organ"], fixed["n_type/organ"]) == (0.5, 2) and len([k for k in fixed if "type/" in k]) == 2
    assert (original["overall"], original["open"]) == (2 / 3, 1.0)


def test_candidates_from_train_by_default_and_public_list_for_original(tmp_path):
    _write(tmp_path, "trainset.json", [_item(0, answer="Yes"), _item(1, answer="Left Lung")])
    _write(tmp_path, "valset.json", [_item(2, answer="no")])
    _write(tmp_path, "testset.json", [_item(3, answer="Heart"), _item(4, answer="yes")])
    _write(tmp_path, "answer_list.json", ["yes", "left lung", "heart", "no"])
    fixed = vqa.answer_candidates(tmp_path, "fixed")
    assert fixed == ["left lung", "yes"]
    assert vqa.answer_candidates(tmp_path, "original") == ["heart", "left lung", "no", "yes"]
    test = vqa.load_vqa(tmp_path, "test")
    with pytest.warns(UserWarning, match=r"1 of 2 test items have an answer not in the candidate list"):
        assert vqa.count_unanswerable(test, fixed, "test items") == 1
    with pytest.raises(ValueError, match="protocol must be one of"):
        vqa.answer_candidates(tmp_path, "lenient")


def test_captions_cut_to_30_words_and_empty_counted(tmp_path):
    long = " ".join(f"w{i}" for i in range(50))
    data = [{"image": "a.png", "caption": "A Chest X-ray, showing: effusion!"},
            {"image": "b.png", "caption": [long, ""]},
            {"image": "c.png", "caption": "   "}]
    path = _write(tmp_path, "roco.json", data)
    with pytest.warns(UserWarning, match=r"2 empty caption\(s\); 1 item\(s\) with no caption left were skipped"):
        items, stats = captions.read_caption_json(path, tmp_path)
    assert stats == {"entries": 3, "kept": 2, "empty_captions": 2, "empty_entries": 1}
    assert items[0].captions == ("a chest x ray showing effusion",)
    assert len(items[1].captions[0].split()) == 30


def test_caption_missing_field_and_escape(tmp_path):
    path = _write(tmp_path, "medicat.json", [{"image": "a.png", "caption": "x"}, {"image": "b.png"}])
    with pytest.raises(ValueError, match=r"item 1 is missing field 'caption'"):
        captions.read_caption_json(path, tmp_path)
    path = _write(tmp_path, "clef.json", [{"image": "../../x.png", "caption": "x"}])
    with pytest.raises(ValueError, match="escapes the dataset folder"):
        captions.read_caption_json(path, tmp_path / "images")


def _tiny_corpus(path):
    from jaxboost.data import corpus
    rng = np.random.default_rng(0)
    records = []
    for i, (view, phase, sex, quality, split) in enumerate([("2CH", "ED", "F", "Good", "train"),
                                                            ("4CH", "ES", "M", "Poor", "train"),
                                                            ("4CH", "ED", "M", "Medium", "test")]):
        mask = np.zeros((32, 32), np.uint8)
        mask[4:14, 8:20], mask[14:20, 8:20] = 1, 2
        if i != 1:
            mask[22:28, 10:18] = 3  # no left atrium in image 1
        image = rng.integers(0, 255, (32, 32)).astype(np.uint8)
        records += corpus.make_records(image, mask, name=f"p{i}_{view}_{phase}", patient=f"p{i}", view=view,
                                       phase=phase, sex=sex, age=60, quality=quality, split=split,
                                       source="phantom", size=32)
    corpus.build_corpus(records, path, size=32, source="phantom")


def test_echo_vqa_builds_vqarad_format_that_reads_back(tmp_path):
    from jaxboost.data import echo_vqa
    _tiny_corpus(tmp_path / "corpus")
    counts = echo_vqa.build_echo_vqa(tmp_path / "corpus", tmp_path / "vqa")
    out = tmp_path / "vqa"
    assert counts["train"] > 0 and counts["val"] == 0 and counts["test"] > 0 and counts["captions"] == 5
    assert not (tmp_path / "vqa" / "valset.json").exists() and len(vqa.load_vqa(tmp_path / "vqa", "val")) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train = vqa.load_vqa(out, "train") + vqa.load_vqa(out, "val")
    test = vqa.load_vqa(out, "test")
    assert all(it.image_path.is_file() for it in train + test)
    by_q = {(it.image_path.name, it.question): it.answer for it in train}
    assert by_q[("phantom_p1_4CH_ES.png", "is the left atrium visible?")] == "no"
    assert by_q[("phantom_p0_2CH_ED.png", "which view is this echocardiogram?")] == "two chamber"
    assert by_q[("phantom_p0_2CH_ED_MYO.png", "which structure is highlighted?")] == "myocardium"
    assert by_q[("phantom_p0_2CH_ED.png", "is the patient female?")] == "yes"
    assert ("phantom_p1_4CH_ES_LA.png", "which structure is highlighted?") not in by_q  # absent structure
    assert {it.answer_type for it in train} == {"OPEN", "CLOSED"}
    caps, stats = captions.read_caption_json(out / "captions_train.json", out / "images")
    assert stats["empty_captions"] == 0 and len(caps[0].captions) == 4
    with pytest.raises(FileExistsError):
        echo_vqa.build_echo_vqa(tmp_path / "corpus", out)


def test_bert_wordpiece_trained_on_corpus_text_saves_and_reloads(tmp_path):
    from jaxboost.data.tokenize_bert import BertTokenizer
    texts = ["left ventricle in two-chamber view at end of the diastole cycle of a sixty-year-old woman."] * 4
    texts += ["which structure is highlighted?", "myocardium", "left atrium"]
    tok = BertTokenizer.train(texts, str(tmp_path / "tok"), vocab_size=300)
    ids, mask = tok.tokenize(["Left Ventricle of the heart.", "which structure is highlighted? " * 10])
    assert ids.shape == (2, 25) and ids.dtype == np.int32
    assert ids[0, 0] == tok.cls_id and ids[1, -1] == tok.sep_id and mask[1].all()
    assert ids[0, mask[0].sum() - 1] == tok.sep_id and (ids[0, mask[0].sum():] == tok.pad_id).all()
    assert tok.hf.convert_ids_to_tokens([int(ids[0, 1])]) == ["left"]
    assert len(set(tok.special_ids + (tok.mask_id,))) == 4
    for again in (BertTokenizer.from_folder(str(tmp_path / "tok")),
                  BertTokenizer.from_vocab(str(tmp_path / "tok" / "vocab.txt"))):
        np.testing.assert_array_equal(again.tokenize(["Left Ventricle of the heart."])[0], ids[:1])
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        BertTokenizer.from_folder(str(tmp_path / "nope"))
