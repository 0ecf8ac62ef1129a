"""triton_kernels/ is the subpackage gapkern.triton_kernels through setup.py's package_dir (no
symlink, no importlib string), in an editable install and in a wheel."""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gapkern

ROOT = Path(__file__).resolve().parents[2]
WHERE = "import gapkern, gapkern.triton_kernels as t; print(gapkern.__file__); print(t.__file__)"


def test_the_link_is_gone_and_the_registry_imports_the_kernels_by_name():
    link = ROOT / "gapkern" / "triton_kernels"
    assert not link.is_symlink() and not link.exists()
    from gapkern.ops import backend

    source = inspect.getsource(backend)
    assert "import_module" not in source and "from .. import triton_kernels" in source


def test_an_editable_install_imports_the_repos_folder():
    """Run in a fresh process from a neutral folder: what the installed package (editable here) finds."""
    if Path(gapkern.__file__).resolve().parent != ROOT / "gapkern":
        pytest.skip(f"gapkern is not this tree's editable install here ({gapkern.__file__})")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", WHERE], cwd="/", env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    package, kernels = run.stdout.split()
    if Path(package).resolve() != ROOT / "gapkern" / "__init__.py":
        pytest.skip(f"without PYTHONPATH, gapkern is another install ({package})")
    assert Path(kernels).resolve() == ROOT / "triton_kernels" / "__init__.py"


def test_a_wheel_installs_the_kernels_inside_the_package(tmp_path):
    """`pip wheel` of a copy of this tree (no CUDA build): the kernels land at gapkern/triton_kernels/, and
    the installed copy imports them from there; nothing lands at a top-level triton_kernels/."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                             ".venv*", "out", ".benchmarks", "*.so", "results"))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "GAPKERN_NO_CUDA": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("gapkern-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernels = sorted(p.name for p in (ROOT / "triton_kernels").glob("*.py"))
    assert sorted(n.split("/")[-1] for n in names if n.startswith("gapkern/triton_kernels/")) == kernels
    assert not [n for n in names if n.startswith("triton_kernels/")]
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                              str(wheel)], env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run([sys.executable, "-c", WHERE], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(site / "gapkern" / "__init__.py"),
                                  str(site / "gapkern" / "triton_kernels" / "__init__.py")]
