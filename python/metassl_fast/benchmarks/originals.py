"""The original implementations our losses replace, for the parity tests
(tests/originals.py) and the benchmark of the drop-ins (benchmarks/family.py, the drop-in table).

Each function returns the package's own code, or raises OriginalMissing (an
ImportError naming the pip command that installs it) when the package is absent.

    pml()              -> the ``pytorch_metric_learning.losses`` module
    info_nce_pkg()     -> the ``info_nce`` module (InfoNCE, info_nce)
    lightly_ntxent()   -> ``lightly.loss.ntx_ent_loss.NTXentLoss``
    open_clip_losses() -> (ClipLoss, SigLipLoss) from ``open_clip/loss.py``

``import lightly.loss`` and ``import open_clip`` import torchvision, which is absent (or
does not import) beside a CPU-only torch.  Where it does not import, the loss files are
loaded straight from the installed package directory: the executed code is still the
package's own file, only the package ``__init__``s that would pull in torchvision are
replaced by empty stubs (see ``_load_lightly_ntxent``).  Versions checked: see
tests/ORIGINALS_NOTES.md.  Install all four without touching torch:

    pip install --no-deps pytorch-metric-learning==2.9.0 info-nce-pytorch==0.1.4 \
        lightly==1.6.0 open_clip_torch==3.3.0
    pip install tqdm          # the only import-time dependency not already present
"""
import importlib
import importlib.util
import os
import sys
import types

PIP = {
    "pytorch-metric-learning": "pip install --no-deps pytorch-metric-learning==2.9.0 tqdm",
    "info-nce-pytorch": "pip install --no-deps info-nce-pytorch==0.1.4",
    "lightly": "pip install --no-deps lightly==1.6.0",
    "open_clip_torch": "pip install --no-deps open_clip_torch==3.3.0",
}


class OriginalMissing(ImportError):
    """An original package is not installed (or does not import)."""


def _skip(dist, why=""):
    raise OriginalMissing(f"{dist} is not installed: {PIP[dist]}" + (f" ({why})" if why else ""))


def _package_dir(name):
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _torchvision_imports():
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:
        return False
    return True


def _stub_package(name, path):
    """An empty package module whose submodules are the real files under ``path``."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = types.ModuleType(name)
        mod.__path__ = [path]
        mod.__file__ = None
        mod.__package__ = name
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    return mod


def _load_file(name, path):
    """Execute the file ``path`` as module ``name`` and register it in sys.modules."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, mod)
    return mod


def pml():
    """The ``pytorch_metric_learning.losses`` module (NTXentLoss, SupConLoss, SelfSupervisedLoss)."""
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        _skip("pytorch-metric-learning")
    try:
        return importlib.import_module("pytorch_metric_learning.losses")
    except ImportError as e:  # e.g. tqdm missing
        _skip("pytorch-metric-learning", f"import failed: {e}")


def info_nce_pkg():
    """The ``info_nce`` module (InfoNCE class and info_nce function)."""
    if importlib.util.find_spec("info_nce") is None:
        _skip("info-nce-pytorch")
    return importlib.import_module("info_nce")


def _load_lightly_ntxent():
    # ntx_ent_loss.py imports lightly.models.modules.memory_bank and lightly.utils.dist;
    # memory_bank.py imports lightly.models.utils (for concat_all_gather), whose top
    # line is `from torchvision.ops import StochasticDepth`.  lightly/__init__ and
    # lightly/utils/__init__ are torch-only and imported for real; lightly.loss,
    # lightly.models and lightly.models.modules get empty stub packages (their real
    # __init__s import torchvision), so the files below them load as themselves.
    root = _package_dir("lightly")
    importlib.import_module("lightly")
    importlib.import_module("lightly.utils.dist")
    _stub_package("lightly.models", os.path.join(root, "models"))
    _stub_package("lightly.models.modules", os.path.join(root, "models", "modules"))
    _stub_package("lightly.loss", os.path.join(root, "loss"))
    if "lightly.models.utils" not in sys.modules:
        # Run the real lightly/models/utils.py with a placeholder torchvision.ops bound
        # only while it executes (StochasticDepth is not used by the memory bank); the
        # placeholder is removed from sys.modules afterwards.
        tv = types.ModuleType("torchvision")
        tv_ops = types.ModuleType("torchvision.ops")
        tv_ops.StochasticDepth = type("StochasticDepth", (), {})
        tv.ops = tv_ops
        saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
        sys.modules.update({"torchvision": tv, "torchvision.ops": tv_ops})
        try:
            _load_file("lightly.models.utils", os.path.join(root, "models", "utils.py"))
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    importlib.import_module("lightly.models.modules.memory_bank")
    return importlib.import_module("lightly.loss.ntx_ent_loss").NTXentLoss


def lightly_ntxent():
    """``lightly.loss.NTXentLoss`` (the class), from lightly/loss/ntx_ent_loss.py."""
    if _package_dir("lightly") is None:
        _skip("lightly")
    if _torchvision_imports():  # the defining module, not lightly.loss (where a drop-in may be assigned)
        return importlib.import_module("lightly.loss.ntx_ent_loss").NTXentLoss
    return _load_lightly_ntxent()


def open_clip_losses():
    """``(ClipLoss, SigLipLoss)`` from open_clip/loss.py (a torch-only file)."""
    root = _package_dir("open_clip")
    if root is None:
        _skip("open_clip_torch")
    if _torchvision_imports():
        mod = importlib.import_module("open_clip.loss")
    else:
        # open_clip/__init__ imports the models (torchvision); loss.py itself needs only
        # torch, so it is loaded alone, under a private name.
        name = "_originals_open_clip_loss"
        mod = sys.modules.get(name) or _load_file(name, os.path.join(root, "loss.py"))
    return mod.ClipLoss, mod.SigLipLoss
