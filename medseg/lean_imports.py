"""MONAI without the optional integrations medseg never uses, so every medseg process starts seconds sooner.

``import monai`` (and so any ``from monai.x import y``) imports *every* MONAI submodule (``monai/__init__.py`` calls
``load_submodules``), and through them the optional packages a few of those submodules reach for with MONAI's
``optional_import``: ``transformers`` (TransCheX's BERT), ``mlflow`` (``MLFlowHandler``), ``matplotlib`` (plotting
helpers), ``pandas`` (CSV datasets, profiling), ``scipy.signal`` (ultrasound confidence maps, signal transforms) and
scikit-learn (the embedding-collapse metric). Measured on the 2-core development machine with MONAI 1.6.1 after
``import torch``: 6.0 s for ``import monai`` as it is, 1.2 s without these six.

:class:`LeanMonaiFinder` (installed by ``medseg/__init__.py``) reports them as missing *only while MONAI's own
package is executing* (``monai.__spec__._initializing``, which the import system sets for a module being
initialised) and *to MONAI's own modules* (a package MONAI imports, e.g. torchvision, and ``importlib.util.find_spec``
asked by anyone else, get their ordinary answers), so MONAI's ``optional_import`` records the features that need
them as unavailable, and once
``monai`` is imported they import normally: medseg's SegFormer still gets ``transformers``, the reports
``matplotlib.pyplot``, tracking ``mlflow``. A package imported before MONAI is not touched (its submodules import
for MONAI as usual).
``MEDSEG_MONAI_FULL_IMPORT=1`` in the environment turns this off (for code that uses those MONAI features in a
medseg process). ``tests/test_lean_imports.py`` checks both halves.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

#: Packages MONAI's ``optional_import`` would pull in at ``import monai`` that no medseg code path uses through MONAI.
OPTIONAL = ("transformers", "mlflow", "matplotlib", "pandas", "scipy.signal", "sklearn")


def monai_initialising() -> bool:
    """Whether ``monai/__init__.py`` is executing now (its module exists but is not yet initialised)."""
    module = sys.modules.get("monai")
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def imported_by_monai() -> bool:
    """Whether the import being resolved was asked for by a MONAI module itself (the first frame outside the
    import machinery belongs to ``monai``): packages MONAI imports (torchvision, scikit-image, ...) import what they
    need as usual, and ``importlib.util.find_spec`` asked by anyone else gets its ordinary answer."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (frame.f_code.co_filename.startswith("<frozen importlib") or module.startswith("importlib")):
            return module == "monai" or module.startswith("monai.")
        frame = frame.f_back  # type: ignore[assignment]
    return False


class LeanMonaiFinder(MetaPathFinder):
    """A meta-path finder that refuses :data:`OPTIONAL` (and their submodules) to MONAI's own modules while MONAI is
    initialising, unless the package itself was imported before."""

    def find_spec(self, fullname: str, path=None, target=None):
        blocked = any((fullname == name or fullname.startswith(name + ".")) and name not in sys.modules for name in OPTIONAL)
        if blocked and monai_initialising() and imported_by_monai():
            raise ModuleNotFoundError(f"{fullname} is not imported while MONAI initialises (medseg.lean_imports)",
                                      name=fullname)
        return None


def install() -> None:
    """Puts :class:`LeanMonaiFinder` first on ``sys.meta_path`` (once), unless ``MEDSEG_MONAI_FULL_IMPORT=1``."""
    if os.environ.get("MEDSEG_MONAI_FULL_IMPORT") == "1":
        return
    if not any(isinstance(finder, LeanMonaiFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LeanMonaiFinder())
