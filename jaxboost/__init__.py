"""jaxboost: Synthetic Boost and MUMC in JAX/Flax."""
from importlib import metadata as _metadata

try:  # the one version number is pyproject.toml's, read from the installed package's metadata
    __version__ = _metadata.version("jaxboost")
except _metadata.PackageNotFoundError:  # a source tree on PYTHONPATH that was never pip-installed
    __version__ = "0+unknown"


def _drop_transformers_torch_notice() -> None:
    """transformers logs "PyTorch was not found. Models won't be available ..." at import when torch is
    absent; jaxboost's models are Flax and it uses transformers for tokenizers only, so the notice misleads.
    Only that one record of the "transformers" logger is dropped: its other warnings still show."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("PyTorch was not found.")

    logger = logging.getLogger("transformers")
    if not any(type(f).__name__ == "_Filter" for f in logger.filters):
        logger.addFilter(_Filter())


_drop_transformers_torch_notice()
