"""d2nwg: diffusion-based neural-network weight generation (D2NWG, ICLR 2025).

Learn the distribution of a zoo of trained weights and synthesize new, task-specific weights
with a conditional latent diffusion model, on fused Triton / CUDA / C++ kernels.
"""

from d2nwg import (
    _kernels_path,  # noqa: F401  (maps kernels/ to d2nwg.kernels in a source tree)
    ops,
)
from d2nwg.errors import (
    BackendUnavailableError,
    ConfigError,
    D2NWGError,
    DeviceError,
    DirectoryLockedError,
    DTypeError,
    FileFormatError,
    FileWriteError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
)
from d2nwg.generator import D2NWG, D2NWGConfig
from d2nwg.nn import (
    ChunkVAE,
    ChunkVAEConfig,
    Condition,
    DatasetEncoder,
    DatasetEncoderConfig,
    LatentDenoiser,
    LatentDenoiserConfig,
    NullConditioner,
    TextConditioner,
    TextConditionerConfig,
    drop_condition,
    load_module,
    save_module,
)
from d2nwg.sampling import PREDICTION_TYPES, SAMPLERS, default_timesteps, sample
from d2nwg.schedule import NoiseSchedule
from d2nwg.tokenizer import WeightTokenizer
from d2nwg.version import __version__
from d2nwg.zoo import ModelZoo, ZooItem

__all__ = [
    "__version__",
    "ops",
    "WeightTokenizer",
    "NoiseSchedule",
    "sample",
    "SAMPLERS",
    "PREDICTION_TYPES",
    "default_timesteps",
    "ModelZoo",
    "D2NWG",
    "D2NWGConfig",
    "ZooItem",
    "ChunkVAE",
    "ChunkVAEConfig",
    "Condition",
    "DatasetEncoder",
    "DatasetEncoderConfig",
    "LatentDenoiser",
    "LatentDenoiserConfig",
    "NullConditioner",
    "TextConditioner",
    "TextConditionerConfig",
    "drop_condition",
    "load_module",
    "save_module",
    "D2NWGError",
    "BackendUnavailableError",
    "ConfigError",
    "DeviceError",
    "DirectoryLockedError",
    "DTypeError",
    "FileFormatError",
    "FileWriteError",
    "KeyMismatchError",
    "NonFiniteError",
    "ShapeError",
]
