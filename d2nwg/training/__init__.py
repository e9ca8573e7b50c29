"""What the generator's training stages share, none of it specific to weight generation.

- :mod:`~d2nwg.training.trainer`: the loop (AdamW, warm-up + cosine, clipping, EMA,
  checkpoints, log, non-finite stop), DDP under ``torchrun``;
- :mod:`~d2nwg.training.lr`, :mod:`~d2nwg.training.ema`: its two formulas;
- :mod:`~d2nwg.training.checkpoints`: exact-resume checkpoints in safetensors;
- :mod:`~d2nwg.training.log`: the JSON-lines loss log;
- :mod:`~d2nwg.training.distributed`: the process group, with collective timeouts.
"""

from d2nwg.training.checkpoints import CHECKPOINT_FORMAT, Checkpoints, pack_state, unpack_state
from d2nwg.training.distributed import DistContext, writer_lock
from d2nwg.training.ema import EMA, ema_decay
from d2nwg.training.log import LossLog
from d2nwg.training.lr import lr_factor
from d2nwg.training.trainer import LoopConfig, Stage, TrainingRun, train_stage

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoints",
    "DistContext",
    "EMA",
    "LoopConfig",
    "LossLog",
    "Stage",
    "TrainingRun",
    "ema_decay",
    "lr_factor",
    "pack_state",
    "train_stage",
    "unpack_state",
    "writer_lock",
]
