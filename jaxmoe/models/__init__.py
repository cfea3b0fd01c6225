"""Supported model families, keyed by their Hugging Face architecture name."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from jaxmoe.config import ModelConfig
from jaxmoe.models import mixtral, olmoe, qwen2_moe, qwen3_moe
from jaxmoe.models.hf import TensorSpec, UnsupportedModelError

FAMILIES: dict[str, ModuleType] = {m.ARCHITECTURE: m for m in (mixtral, qwen2_moe, qwen3_moe, olmoe)}
BY_NAME: dict[str, ModuleType] = {m.__name__.rsplit(".", 1)[-1]: m for m in FAMILIES.values()}
PRESETS: dict[str, dict[str, Any]] = {name: cfg for m in FAMILIES.values() for name, cfg in m.PRESETS.items()}


def family_of(hf_config: dict[str, Any]) -> ModuleType:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise UnsupportedModelError(
        f"unsupported architecture {', '.join(archs) or '(none given in config.json)'}; "
        f"jaxmoe supports: {', '.join(sorted(FAMILIES))}"
    )


def config_from_hf(hf_config: dict[str, Any], dtype: str | None = None, generation: dict | None = None) -> ModelConfig:
    return family_of(hf_config).config_from_hf(hf_config, dtype, generation)


def tensor_map(config: ModelConfig) -> list[TensorSpec]:
    return BY_NAME[config.family].tensor_map(config)


def preset(name: str, dtype: str | None = None) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return config_from_hf(PRESETS[name], dtype)


__all__ = ["FAMILIES", "PRESETS", "TensorSpec", "UnsupportedModelError", "config_from_hf", "family_of", "preset", "tensor_map"]
