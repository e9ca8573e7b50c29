"""Hugging Face interoperability (the optional extra ``pip install d2nwg[hf]``).

- :mod:`.peft`: PEFT adapter folders in (:meth:`d2nwg.ModelZoo.from_peft`) and out
  (:meth:`d2nwg.D2NWG.save_peft`, ``d2nwg generate --peft``). Reading and writing the folders
  needs neither ``peft`` nor ``transformers``; loading what is written does.
- :mod:`.transformers`: ``transformers`` models as targets of generation (the checks of a
  ``PreTrainedModel`` or its config against a generator's layout, and ``config.json``).

Nothing here is imported by ``import d2nwg``; the modules import ``transformers`` and ``peft``
only inside the functions that need them (:func:`require` says how to install them).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md

from d2nwg.errors import MissingDependencyError

EXTRA = "pip install d2nwg[hf]"
PACKAGES = ("transformers", "peft")


def require(name: str):
    """The module ``name`` (``transformers`` or ``peft``), or MissingDependencyError saying how
    to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this needs the Python package {name!r}, which is not importable here "
            f"({type(exc).__name__}: {exc}); install the extra: {EXTRA}"
        ) from exc


def versions() -> dict[str, str | None]:
    """The installed version of each package of the extra (None: not installed)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found
