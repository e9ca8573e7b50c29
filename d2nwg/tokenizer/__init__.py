"""The weight tokenizer: state dicts <-> per-layer normalized chunk tokens ``[N, T, C]``.

Split by what each part does, planning apart from executing:

- :mod:`.limits`: size limits of a layout, checked before anything is allocated;
- :mod:`.layers`: :class:`LayerSpec`, which tensors a template tokenizes (include/exclude
  globs, kinds, tied weights), and the checks of a list of layers;
- :mod:`.plan`: :class:`LayoutPlan`, the pure placement of every element of every layer in
  the token row (token ranges, offsets, mask, positions, kinds, the ops' ChunkPlans), from
  shapes alone;
- :mod:`.rows`: :class:`RowClasses`, the class row each token writes, for layers whose
  dim-0 rows follow the condition's classes (``D2NWGConfig.class_rows``);
- :mod:`.statistics`: per-layer zoo statistics (a streaming fit) and :func:`normalization`;
- :mod:`.checks`: the state dicts, targets and tokens a tokenizer reads and writes, checked;
- :mod:`.io`: the tokenizer file (save, and a load that checks every field);
- :mod:`.weight_tokenizer`: :class:`WeightTokenizer`, which runs the plan on the ops.

Every name importable from the former single module ``d2nwg.tokenizer`` still is. The size
limits live in :mod:`.limits`, where the checks read them; assigning one here
(``d2nwg.tokenizer.MAX_NUM_TOKENS = 2**26``) sets it there.
"""

import sys
import types

from d2nwg.ops.tokenize_op import FLOAT_DTYPES, ChunkPlan  # noqa: F401  (importable here before)
from d2nwg.tensors import StateDict, storage_key
from d2nwg.tokenizer import limits
from d2nwg.tokenizer.io import FORMAT, FORMAT_VERSION
from d2nwg.tokenizer.layers import DEFAULT_EXCLUDE, LayerSpec
from d2nwg.tokenizer.plan import LayoutPlan, RangePart, Segment
from d2nwg.tokenizer.rows import RowClasses, row_classes
from d2nwg.tokenizer.statistics import CENTER_THRESHOLD, normalization
from d2nwg.tokenizer.weight_tokenizer import WeightTokenizer

__all__ = [
    "CENTER_THRESHOLD",
    "DEFAULT_EXCLUDE",
    "FORMAT",
    "FORMAT_VERSION",
    "LayerSpec",
    "LayoutPlan",
    "RangePart",
    "RowClasses",
    "Segment",
    "StateDict",
    "WeightTokenizer",
    "normalization",
    "row_classes",
    "storage_key",
    *limits.NAMES,
]


def _limit(name: str) -> property:
    """``d2nwg.tokenizer.<name>``: the limit of that name in :mod:`.limits`, read and set there."""
    return property(
        lambda module: getattr(limits, name),
        lambda module, value: setattr(limits, name, value),
        doc=f"d2nwg.tokenizer.limits.{name}",
    )


class _Package(types.ModuleType):
    """This package's module type: its size limits are those of :mod:`.limits`."""


for _name in limits.NAMES:
    setattr(_Package, _name, _limit(_name))
del _name
sys.modules[__name__].__class__ = _Package
