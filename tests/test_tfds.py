"""tfds builders prepare ArrayRecord datasets from a phantom and a corpus, read back with as_data_source."""
import numpy as np
import tensorflow_datasets as tfds

from jaxboost.data import camus, corpus, phantom
from jaxboost.data.tfds import CamusBuilder, EchoCorpusBuilder


def test_tfds_builders_prepare_and_read_back(tmp_path):
    root = phantom.write_phantom(tmp_path / "phantom", patients=3, seed=0, fmt="mhd", size=(40, 32))
    download = tfds.download.DownloadConfig(manual_dir=str(root))
    builder = CamusBuilder(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=download)
    source = builder.as_data_source()
    assert {split: len(source[split]) for split in ("train", "val", "test")} == {"train": 4, "val": 4, "test": 4}
    example = source["test"][0]
    record = [r for r in camus.read_camus(root) if r.split == "test"][0]
    image, mask = record.load()
    assert {source["test"][i]["patient"] for i in range(4)} == {b"patient0003"}  # tfds Text decodes to bytes
    matching = [source["test"][i] for i in range(4)
                if np.array_equal(source["test"][i]["mask"], mask) and np.array_equal(source["test"][i]["image"], image)]
    assert len(matching) == 1 and example["image"].shape == (40, 32)

    out = tmp_path / "corpus"
    items, info = corpus.camus_items(root, size=16, source="phantom")
    corpus.build_corpus(items, out, size=16, source="phantom", records_per_shard=5, source_info=info)
    builder = EchoCorpusBuilder(data_dir=str(tmp_path / "tfds"), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(out)))
    source = builder.as_data_source()
    assert len(source["train"]) == 12 and len(source["val"]) == 12 and len(source["test"]) == 12
    ours = {r["key"]: r for r in corpus.open_corpus(out).iter("val")}
    example = source["val"][0]
    key = example["key"].decode() if isinstance(example["key"], bytes) else example["key"]
    np.testing.assert_array_equal(example["mask"], ours[key]["mask"])
    prompt = example["prompts"][7][0]
    assert (prompt.decode() if isinstance(prompt, bytes) else prompt) == ours[key]["prompts"][7][0]
