"""tfds builder for a jaxboost triplet corpus folder (manual_dir): one example per (image, structure)."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxboost.data import corpus as corpus_lib

_TEXT_FIELDS = ("key", "structure", "patient", "view", "phase", "sex", "quality", "split", "source")


class Builder(tfds.core.GeneratorBasedBuilder):
    """The triplet corpus as a tfds dataset (records as in jaxboost.data.corpus; prompts as [8, 2] strings)."""

    name = "jaxboost_echo_corpus"
    VERSION = tfds.core.Version(f"{corpus_lib.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES = {f"{corpus_lib.SCHEMA_VERSION}.0.0": "Triplet corpus schema version "
                     f"{corpus_lib.SCHEMA_VERSION}."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at a corpus folder written by `jaxboost corpus build`."

    def _info(self) -> tfds.core.DatasetInfo:
        arrays = {name: tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib")
                  for name in corpus_lib.ARRAY_FIELDS}
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                **arrays,
                **{name: tfds.features.Text() for name in _TEXT_FIELDS},
                "label": tfds.features.Scalar(dtype=np.int32), "age": tfds.features.Scalar(dtype=np.int32),
                "prompts": tfds.features.Tensor(shape=(8, 2), dtype=np.object_),
            }))

    def _split_generators(self, dl_manager):
        corpus = corpus_lib.open_corpus(dl_manager.manual_dir)
        return {split: self._generate_examples(corpus, split) for split in corpus_lib.SPLITS}

    def _generate_examples(self, corpus, split):
        for record in corpus.iter(split):
            example = {name: record[name] for name in (*corpus_lib.ARRAY_FIELDS, *_TEXT_FIELDS, "label", "age")}
            example["prompts"] = np.asarray(record["prompts"], dtype=object)
            yield record["key"], example
