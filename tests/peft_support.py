"""PEFT for the interoperability tests, imported past the repository's `kernels/` folder.

transformers (which peft imports) imports the PyPI package `kernels` (the Hugging Face kernels
hub) by its bare name. Under pytest the repository root is on sys.path, and its folder
`kernels/` (installed as fused_adapters.kernels, never imported by its bare name by this
package) would shadow that package, so `import peft` would fail inside transformers. The real
`kernels` is imported once with the root taken off sys.path; sys.modules then answers every
later `import kernels` with it.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _repository_kernels(module) -> bool:
    """Whether `module` is the repository's kernels/ folder imported by its bare name."""
    path = getattr(module, "__file__", None)
    return path is None or pathlib.Path(path).resolve().is_relative_to(ROOT / "kernels")


def _import_site_kernels() -> None:
    """Import the installed `kernels` (if any) with the repository root off sys.path."""
    cached = sys.modules.get("kernels")
    if cached is not None:
        if not _repository_kernels(cached):
            return  # the installed one already
        for key in [key for key in sys.modules if key == "kernels" or key.startswith("kernels.")]:
            del sys.modules[key]  # the repository folder, imported by its bare name by someone
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != str(ROOT)]
    try:
        module = importlib.import_module("kernels")
    except ImportError:
        return  # not installed: transformers then does without it
    finally:
        sys.path[:] = saved
    if _repository_kernels(module):
        del sys.modules["kernels"]
        raise RuntimeError(f"`kernels` resolved to the repository's folder ({module.__file__}), not the installed "
                           f"package transformers needs")


def import_peft():
    """The peft module; the calling test module is skipped (with the reason) when peft is not
    installed (it is in the dev extras: pip install -e .[dev])."""
    _import_site_kernels()  # first: a failed import would leave transformers half imported
    return pytest.importorskip("peft", reason="the PEFT interoperability tests need peft (pip install -e .[dev])")
