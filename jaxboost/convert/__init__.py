"""Weight converters, one file per source format. The Python entry points are importable from here
lazily (no torch import until one is used): `jaxboost.convert.clipseg_from_hf(path)` etc."""
import importlib

_ENTRY_POINTS = {
    "clipseg_from_hf": "jaxboost.convert.hf_clipseg",
    "cris_from_checkpoint": "jaxboost.convert.cris",
    "sdm_from_torch_state_dict": "jaxboost.convert.sdm",
}


def __getattr__(name):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'jaxboost.convert' has no attribute {name!r}")
