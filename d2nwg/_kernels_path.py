"""Make ``d2nwg.kernels`` importable when d2nwg is imported straight from a source tree.

Installed (wheel or editable), ``kernels/`` is mapped to ``d2nwg.kernels`` by setup.py. When
Python picks up ``./d2nwg`` from the current directory instead (running from the repository
root), the sibling ``kernels/`` is registered under that name here.
"""

import importlib.util
import os
import sys

if "d2nwg.kernels" not in sys.modules and importlib.util.find_spec("d2nwg.kernels") is None:
    _init = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py"
    )
    if os.path.exists(_init):
        _spec = importlib.util.spec_from_file_location(
            "d2nwg.kernels", _init, submodule_search_locations=[os.path.dirname(_init)]
        )
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["d2nwg.kernels"] = _module
        _spec.loader.exec_module(_module)
