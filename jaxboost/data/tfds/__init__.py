"""tensorflow-datasets builders (ArrayRecord files, Tensor/Text features only, so no TensorFlow is needed);
`pip install 'jaxboost[tfds]'` brings tensorflow-datasets.

    from jaxboost.data.tfds import CamusBuilder, EchoCorpusBuilder
    builder = CamusBuilder(data_dir=D, file_format="array_record",
                           config=None)  # manual_dir via tfds.download.DownloadConfig(manual_dir=CAMUS_DIR)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=CAMUS_DIR))
    train = builder.as_data_source()["train"]
Importing this package registers "jaxboost_camus" and "jaxboost_echo_corpus" with tfds.
"""
try:
    import tensorflow_datasets  # noqa: F401
except ModuleNotFoundError as e:
    raise ModuleNotFoundError("jaxboost.data.tfds needs tensorflow-datasets: pip install 'jaxboost[tfds]'") from e

from jaxboost.data.tfds.camus.camus_dataset_builder import Builder as CamusBuilder
from jaxboost.data.tfds.echo_corpus.echo_corpus_dataset_builder import Builder as EchoCorpusBuilder

__all__ = ["CamusBuilder", "EchoCorpusBuilder"]
