"""tfds builder for CAMUS (or the jaxboost phantom): one example per image, patient-split as Synthetic Boost splits CAMUS.

manual_dir: a CAMUS folder in either layout (see jaxboost.data.camus); nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from jaxboost.data import camus as camus_lib


class Builder(tfds.core.GeneratorBasedBuilder):
    """CAMUS apical 2CH/4CH ED/ES images with LV/MYO/LA masks (labels 0-3) and patient metadata."""

    name = "jaxboost_camus"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, masks and Info cfg metadata; splits train/val/test by patient."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Point manual_dir at a CAMUS folder (training/ + testing/ of the mhd release, or the patient folders "
        "of the 2023 nii release), or at a phantom written by `jaxboost phantom`.")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
                "mask": tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="zlib"),
                "patient": tfds.features.Text(), "view": tfds.features.Text(), "phase": tfds.features.Text(),
                "sex": tfds.features.Text(), "age": tfds.features.Scalar(dtype=np.int32),
                "quality": tfds.features.Text(),
            }),
            supervised_keys=("image", "mask"),
        )

    def _split_generators(self, dl_manager):
        records = camus_lib.read_camus(dl_manager.manual_dir)
        return {split: self._generate_examples([r for r in records if r.split == split])
                for split in ("train", "val", "test")}

    def _generate_examples(self, records):
        for record in records:
            image, mask = record.load()
            yield record.name, {"image": image, "mask": mask, "patient": record.patient, "view": record.view,
                                "phase": record.phase, "sex": record.sex, "age": record.age,
                                "quality": record.quality}
