"""Make ``d2nwg.kernels`` importable when d2nwg is imported from a source tree.

``kernels/`` has no ``__init__.py`` on purpose. Python finds a folder without one only as a
namespace portion, and a regular package of the same name anywhere on ``sys.path`` outranks a
namespace portion: from the repository root (or with it on ``PYTHONPATH``, as in the tests)
``import kernels`` is Hugging Face's ``kernels`` (which ``transformers`` imports) when that is
installed, and this folder never shadows it.

Installed from a wheel, setup.py's ``package_dir`` puts the folder at ``d2nwg/kernels/`` (a
namespace subpackage of ``d2nwg`` that the import system finds on its own). When ``d2nwg`` is
a source tree's folder (the repository root on ``sys.path``, or an editable install, whose
setuptools finder maps only folders with an ``__init__.py``), the tree's own ``kernels/`` is
registered as ``d2nwg.kernels`` here, so the kernels always come from the same tree as the
rest of the package.
"""

import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A source tree: setup.py beside d2nwg/, and kernels/ holding d2nwg's kernel modules (in
# site-packages the folder beside d2nwg/ named kernels/ is Hugging Face's package).
_MARKERS = ("setup.py", "kernels/tokenize.py", "kernels/sampler_step.py")


def _register_source_kernels() -> None:
    if not all(os.path.isfile(os.path.join(_ROOT, *m.split("/"))) for m in _MARKERS):
        return
    spec = importlib.machinery.ModuleSpec("d2nwg.kernels", None, is_package=True)
    spec.submodule_search_locations = [os.path.join(_ROOT, "kernels")]
    module = importlib.util.module_from_spec(spec)
    sys.modules["d2nwg.kernels"] = module
    sys.modules["d2nwg"].kernels = module  # what importing a submodule does


if "d2nwg.kernels" not in sys.modules:
    _register_source_kernels()
