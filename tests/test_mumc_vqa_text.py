"""MUMC's VQA text (dataset/utils.py pre_question, VQA.py's inputs): cleaned questions as "[CLS] q" without
[SEP] cut at 25 tokens; answers "[CLS] a [SEP]" never truncated. Expected values written out by hand."""
import numpy as np

from jaxboost.data import vqa as vqa_lib
from jaxboost.data.tokenize_bert import BertTokenizer
from jaxboost.train import mumc_vqa


def test_pre_question_follows_mumc():
    assert vqa_lib.pre_question("Is this an X-ray of the chest?") == "is this an xray of the chest"
    assert vqa_lib.pre_question("Is/are the lungs (left, right) normal?  ") == "is the lungs left right normal"
    assert vqa_lib.pre_question("Size > 2cm? -yes/no") == "size more than  2cm"
    assert vqa_lib.pre_question("one two three four", max_words=2) == "one two"


def _tokenizer(tmp_path):
    words = ["is", "this", "an", "xray", "of", "the", "chest", "a", "very", "long", "answer", "yes"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return BertTokenizer.from_vocab(str(tmp_path / "vocab.txt"), 25)


def test_questions_have_no_sep_and_stop_at_25_tokens(tmp_path):
    tok = _tokenizer(tmp_path)
    ids, mask = mumc_vqa.tokenize_questions(tok, ["Is this an X-ray?", " ".join(["chest"] * 40)], 25)
    assert ids.shape == (2, 25)
    np.testing.assert_array_equal(ids[0, :5], [2, 5, 6, 7, 8])    # [CLS] is this an xray
    np.testing.assert_array_equal(mask[0], [1] * 5 + [0] * 20)
    assert (ids[1] == 11).sum() == 24 and ids[1, 0] == 2 and not (ids == 3).any()


def test_answers_end_with_sep_untruncated(tmp_path):
    tok = _tokenizer(tmp_path)
    long = " ".join(["a", "very", "long", "answer"] * 3)
    ids, mask = mumc_vqa.tokenize_answers(tok, ["yes", long])
    assert ids.shape == (2, 14)                                   # [CLS] + 12 words + [SEP]
    np.testing.assert_array_equal(ids[0, :3], [2, 16, 3])
    assert ids[1, -1] == 3 and mask[1].sum() == 14
