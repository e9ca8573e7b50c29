"""The generator: :class:`D2NWG` and :class:`D2NWGConfig` (see :mod:`d2nwg.generator.facade`
for the map of this package)."""

from d2nwg.generator.config import (
    BATCH_ELEMENTS,
    CONDITION_RANKS,
    CONDITION_SHAPES,
    CONDITIONS,
    WINDOW_DRAWS,
    D2NWGConfig,
)
from d2nwg.generator.facade import D2NWG
from d2nwg.generator.networks import ConditionalDenoiser, Parts
from d2nwg.generator.synthesis import SamplingOptions

__all__ = [
    "BATCH_ELEMENTS",
    "CONDITIONS",
    "CONDITION_RANKS",
    "CONDITION_SHAPES",
    "ConditionalDenoiser",
    "D2NWG",
    "D2NWGConfig",
    "Parts",
    "SamplingOptions",
    "WINDOW_DRAWS",
]
