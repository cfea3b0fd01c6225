"""Hugging Face checkpoint -> jaxmoe checkpoint conversion (installed as `jaxmoe.convert`)."""

from jaxmoe.convert.convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
