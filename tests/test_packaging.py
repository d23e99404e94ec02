"""The package is self-contained: one version, a license, type markers, a changelog entry."""

import importlib.metadata
import pathlib
import subprocess
import sys

import fused_adapters
import fused_adapters.adapters
import fused_adapters.kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIST = "fused-adapters"


def test_version_is_the_installed_metadata_version():
    # setup.py reads __version__ from package/__init__.py; an editable install records it at
    # install time, so a bumped version needs `pip install -e .` again.
    assert fused_adapters.__version__ == importlib.metadata.version(DIST)


def test_top_level_package_is_regular_and_imports_neither_torch_nor_triton():
    assert fused_adapters.__file__ is not None  # a regular package, not an implicit namespace one
    # From the repository root (on sys.path, as under pytest): the installed package, and the
    # interpreter switch TRITON_INTERPRET can still be set after `import fused_adapters`.
    code = ("import sys, fused_adapters; print(fused_adapters.__version__); "
            "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == [fused_adapters.__version__, "[]"]


def test_license():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "Copyright 2026 The fused-adapters authors" in text
    metadata = importlib.metadata.metadata(DIST)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "LICENSE" in metadata.get_all("License-File")


def test_py_typed_next_to_every_package():
    for module in (fused_adapters, fused_adapters.kernels, fused_adapters.adapters):
        assert (pathlib.Path(module.__file__).parent / "py.typed").is_file(), module.__name__


def test_changelog_has_the_current_version():
    assert f"## [{fused_adapters.__version__}]" in (ROOT / "CHANGELOG.md").read_text()
