"""Registers the joint intent + slot model with transformers' Auto classes once transformers' Auto modules load.

After ``import atm_ray``, ``AutoModel.from_pretrained(export)`` and ``AutoConfig.from_pretrained(export)``
load an atm-ray export without ``trust_remote_code``. Registering needs the model class, so torch and
transformers (6–10 s on an idle 2-core machine), while ``import atm_ray`` costs 0.04 s and is paid by every
Ray process: the A/B ledger's replica, each task and actor, ``atm-ray --help``. So ``import atm_ray`` only
installs a post-import hook, and registration happens when the process imports
one of ``transformers.models.auto``'s ``configuration_auto``, ``modeling_auto`` or ``tokenization_auto``
(``AutoConfig``, ``AutoModel`` and ``AutoTokenizer`` each do); torch is already imported by then, so it adds only our model module.
(``wrapt.register_post_import_hook`` does this too, but importing wrapt alone costs 0.11 s.)
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

AUTO_CONFIG = "transformers.models.auto.configuration_auto"
AUTO_MODEL = "transformers.models.auto.modeling_auto"
AUTO_TOKENIZER = "transformers.models.auto.tokenization_auto"
AUTO_MODULES = (AUTO_CONFIG, AUTO_MODEL, AUTO_TOKENIZER)
MODEL_MODULE = "atm_ray.nlu.model"  # registers the Auto classes at the end of its own import


def _initializing(name: str) -> bool:
    """Whether module ``name`` is imported but still executing (importlib marks its spec meanwhile)."""
    module = sys.modules.get(name)
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


_pending = {"registration": False}


def _register(loaded: str) -> None:
    if MODEL_MODULE in sys.modules:
        return  # imported (so registered) or being imported (it registers when it finishes)
    half_done = [name for name in (*AUTO_MODULES, *(name for name in sys.modules if name.startswith("atm_ray.")))
                 if name != loaded and _initializing(name)]
    if half_done:
        # e.g. configuration_auto finished inside tokenization_auto's import, or inside the import of one of
        # our modules: our model imports AutoTokenizer and our modules, some only half-initialised now. The
        # outer import's hook registers when it finishes.
        _pending["registration"] = True
        return
    _pending["registration"] = False
    try:
        importlib.import_module(MODEL_MODULE)
    except Exception as error:  # a failure here must not break the user's import of transformers
        warnings.warn(f"atm-ray could not register its model with transformers' Auto classes: {error!r}", stacklevel=2)


class _NotifyingLoader:
    """Runs the real loader, then registers; other attributes (``get_source``, ...) are the real loader's."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        if self._name in AUTO_MODULES or _pending["registration"]:
            _register(self._name)

    def __getattr__(self, attribute):
        return getattr(self._loader, attribute)


class _AutoModulesFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the other finders for transformers' Auto modules and wraps their loader."""

    def find_spec(self, name, path, target=None):
        if MODEL_MODULE in sys.modules:
            return None
        # our own modules too: one that imports transformers' Auto modules finishes after them
        if name not in AUTO_MODULES and not name.startswith("atm_ray."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _NotifyingLoader(spec.loader, name)
                return spec
        return None


def install() -> None:
    """Registers now if transformers' Auto modules are already loaded, else when they load."""
    loaded = [name for name in AUTO_MODULES if name in sys.modules and not _initializing(name)]
    if loaded:
        _register(loaded[0])
    if MODEL_MODULE not in sys.modules and not any(isinstance(finder, _AutoModulesFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoModulesFinder())
