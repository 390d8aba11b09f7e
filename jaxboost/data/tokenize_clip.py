"""CLIP tokenization for CLIPSeg and CRIS, from local files only.

- `ClipTokenizer.from_folder(DIR)`: a CLIP BPE tokenizer saved by transformers (`save_pretrained` of
  CLIPTokenizer/CLIPTokenizerFast, e.g. the one beside a CLIPSeg checkpoint).
- `ClipTokenizer.train(texts, DIR)`: where no CLIP vocabulary is at hand (the phantom), a byte-level BPE
  trained with `tokenizers` on the given texts (the prompt vocabulary), with CLIP's conventions:
  lower-cased, `<|startoftext|>` ... `<|endoftext|>`, padded with `<|endoftext|>`, and the end-of-text id
  the largest in the vocabulary (so argmax pooling finds it, as OpenAI CLIP and CRIS assume). Saved with
  `save_pretrained` into DIR, so a run's workdir records the tokenizer it used and reloads it.
`tokenize(texts)` -> input_ids, attention_mask [N, context_length] int32 numpy.
"""
from __future__ import annotations

import os

import numpy as np

from jaxboost.data import json_list

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ClipTokenizer:
    def __init__(self, hf_tokenizer, context_length: int = 77, source: str = ""):
        self.hf = hf_tokenizer
        self.hf.model_max_length = 10 ** 9  # lengths are checked in tokenize(), with the text named
        self.context_length = context_length
        self.source = source
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else \
            hf_tokenizer.convert_tokens_to_ids(EOS)

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        """The text encoder's embedding rows must be at least this."""
        return len(self.hf)

    @property
    def eos_token_id(self) -> int:
        return self.hf.convert_tokens_to_ids(EOS)

    @classmethod
    def from_folder(cls, folder: str, context_length: int = 77) -> "ClipTokenizer":
        from transformers import AutoTokenizer
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(f"{folder} holds no tokenizer.json or vocab.json (a save_pretrained "
                                    "tokenizer folder is expected)")
        json_list.check_json_files(folder)
        return cls(AutoTokenizer.from_pretrained(folder, local_files_only=True), context_length, folder)

    @classmethod
    def train(cls, texts, out_dir: str, vocab_size: int = 1000, context_length: int = 77) -> "ClipTokenizer":
        """Train a CLIP-style byte-level BPE on `texts` and save it (save_pretrained layout) to out_dir."""
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast
        texts = list(texts)
        if not texts:
            raise ValueError("ClipTokenizer.train needs at least one text")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase(), normalizers.Strip()])
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        # Specials appended last: <|endoftext|> gets the largest id, as in CLIP's vocabulary.
        tok.add_special_tokens([BOS, EOS])
        bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}",
                                                           special_tokens=[(BOS, bos), (EOS, eos)])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                     unk_token=EOS, model_max_length=context_length)
        os.makedirs(out_dir, exist_ok=True)
        hf.save_pretrained(out_dir)
        return cls(hf, context_length, out_dir)

    def tokenize(self, texts, context_length: int | None = None, truncate: bool = False):
        """texts (str or list) -> (input_ids, attention_mask), each [N, context_length] int32.

        A text longer than the context is an error naming it, unless `truncate=True` (then it is cut and
        ends with <|endoftext|>, as OpenAI's `clip.tokenize(truncate=True)`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        rows = self.hf(texts, add_special_tokens=True)["input_ids"]
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for i, row in enumerate(rows):
            if len(row) > length:
                if not truncate:
                    raise ValueError(f"text {i} has {len(row)} tokens, more than the context length {length}: "
                                     f"{texts[i][:80]!r} (pass truncate=True to cut it)")
                row = row[:length - 1] + [self.eos_token_id]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = 1
        return ids, mask
