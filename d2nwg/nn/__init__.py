"""d2nwg's networks: ChunkVAE, LatentDenoiser, condition encoders, and their file helpers."""

from d2nwg.nn.conditioners import (
    Condition,
    DatasetEncoder,
    DatasetEncoderConfig,
    NullConditioner,
    TextConditioner,
    TextConditionerConfig,
    drop_condition,
)
from d2nwg.nn.denoiser import LatentDenoiser, LatentDenoiserConfig
from d2nwg.nn.io import JSONConfig, load_module, save_module
from d2nwg.nn.vae import ChunkVAE, ChunkVAEConfig

__all__ = [
    "ChunkVAE",
    "ChunkVAEConfig",
    "Condition",
    "DatasetEncoder",
    "DatasetEncoderConfig",
    "JSONConfig",
    "LatentDenoiser",
    "LatentDenoiserConfig",
    "NullConditioner",
    "TextConditioner",
    "TextConditionerConfig",
    "drop_condition",
    "load_module",
    "save_module",
]
