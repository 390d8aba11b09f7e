"""jaxboost: Synthetic Boost and MUMC in JAX/Flax."""

__version__ = "0.1.0"
