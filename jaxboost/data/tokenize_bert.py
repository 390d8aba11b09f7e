"""BERT WordPiece tokenization for MUMC, from local files only.

- `BertTokenizer.from_folder(DIR)` / `from_vocab(vocab.txt)`: uncased WordPiece (transformers
  BertTokenizerFast) from a local vocabulary, e.g. the one beside a converted bert-base-uncased.
- `BertTokenizer.train(texts, DIR)`: for the phantom (no vocabulary at hand), a WordPiece trained with
  `tokenizers` on the corpus text (captions, questions, answers), BERT-normalised (lowercase, accents
  stripped), with [PAD]=0 [UNK] [CLS] [SEP] [MASK]; saved with `save_pretrained` into DIR so the run's
  workdir records the tokenizer and reloads it with `from_folder`.
`tokenize(texts, max_length=25)` -> input_ids, attention_mask [N, max_length] int32 numpy
([CLS] text [SEP], truncated, padded with [PAD]).
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from jaxboost.data import json_list

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class BertTokenizer:
    def __init__(self, hf_tokenizer, max_length: int = 25, source: str = ""):
        self.hf = hf_tokenizer
        self.max_length = max_length
        self.source = source
        missing = [t for t in SPECIAL_TOKENS if t not in hf_tokenizer.get_vocab()]
        if missing:
            raise ValueError(f"tokenizer {source or ''} lacks special tokens {missing}")

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def token_id(self, token: str) -> int:
        return int(self.hf.convert_tokens_to_ids(token))

    @property
    def pad_id(self) -> int:
        return self.token_id("[PAD]")

    @property
    def cls_id(self) -> int:
        return self.token_id("[CLS]")

    @property
    def sep_id(self) -> int:
        return self.token_id("[SEP]")

    @property
    def mask_id(self) -> int:
        return self.token_id("[MASK]")

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids MLM never masks ([PAD], [CLS], [SEP])."""
        return (self.pad_id, self.cls_id, self.sep_id)

    @classmethod
    def from_folder(cls, folder: str, max_length: int = 25) -> "BertTokenizer":
        from transformers import BertTokenizerFast
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.txt")):
            raise FileNotFoundError(f"{folder} holds no tokenizer.json or vocab.txt")
        json_list.check_json_files(folder)
        return cls(BertTokenizerFast.from_pretrained(folder, local_files_only=True), max_length, folder)

    @classmethod
    def from_vocab(cls, vocab_file: str, max_length: int = 25, lowercase: bool = True) -> "BertTokenizer":
        from transformers import BertTokenizerFast
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"vocab file not found: {vocab_file}")
        with open(vocab_file, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        return cls(BertTokenizerFast(vocab=vocab, do_lower_case=lowercase), max_length, vocab_file)

    @classmethod
    def train(cls, texts, out_dir: str, vocab_size: int = 2000, max_length: int = 25) -> "BertTokenizer":
        """Build an uncased WordPiece vocabulary from `texts` and save it (save_pretrained layout + vocab.txt).

        The same texts always give the same vocabulary in the same order: `tokenizers`' WordPieceTrainer breaks
        ties between equally frequent merges in hash order, so it returns another vocabulary on every call.
        Here the vocabulary is the special tokens, every character (alone and as a ##continuation, so nothing
        is [UNK]), then whole words by frequency (ties by spelling) up to `vocab_size`; tokenization is the
        usual WordPiece greedy longest match (`tokenizers.models.WordPiece`)."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import BertTokenizerFast
        texts = list(texts)
        if not texts:
            raise ValueError("BertTokenizer.train needs at least one text")
        normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        vocab = _wordpiece_vocab(texts, normalizer, pre_tokenizer, vocab_size)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        hf = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "vocab.txt"), "w") as f:  # for vocab.txt-based BERT tokenizers
            f.write("".join(token + "\n" for token in vocab))
        return cls.from_folder(out_dir, max_length)

    def tokenize(self, texts, max_length: int | None = None):
        """list of str -> (input_ids, attention_mask) int32 [N, max_length]."""
        length = max_length or self.max_length
        enc = self.hf(list(texts), padding="max_length", truncation=True, max_length=length,
                      return_attention_mask=True)
        return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def _wordpiece_vocab(texts, normalizer, pre_tokenizer, vocab_size: int) -> dict[str, int]:
    """token -> id: special tokens, characters, ##characters, then words by (-count, word)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    known = set(tokens)
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in known]
    tokens += words[:max(0, vocab_size - len(tokens))]
    return {token: i for i, token in enumerate(tokens)}
