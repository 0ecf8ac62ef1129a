"""Packaging: the pure-Python package, plus the CUDA extension ``gapkern._C``.

The extension (csrc/ kernels, python/ pybind11 glue, CMakeLists.txt) is built
with CMake and Ninja whenever ``nvcc`` is found; without nvcc, or with
``GAPKERN_NO_CUDA=1``, one line says it is skipped and the pure-Python package
installs alone (the cuda backend then reports "not built"). The build targets
sm_80 and sm_90 (plus sm_90 PTX); ``GAPKERN_CUDA_ARCHS="90a"`` (CMake syntax)
overrides that.

The Triton kernels live in the top-level folder ``triton_kernels/`` (the design's folders say the
architecture) and install as the subpackage ``gapkern.triton_kernels`` through ``package_dir``:
a top-level ``triton_kernels`` would clash with an existing package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "gapkern._C"
PACKAGE_DIR = {"gapkern.triton_kernels": "triton_kernels"}  # the folder triton_kernels/ is gapkern.triton_kernels
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def find_nvcc(env=os.environ) -> str | None:
    """nvcc on PATH, else under CUDA_HOME or CUDA_PATH (when neither is set: /usr/local/cuda)."""
    found = shutil.which("nvcc", path=env.get("PATH", ""))
    if found:
        return found
    roots = [env[k] for k in ("CUDA_HOME", "CUDA_PATH") if env.get(k)] or ["/usr/local/cuda"]
    for root in roots:
        nvcc = os.path.join(root, "bin", "nvcc")
        if os.access(nvcc, os.X_OK):
            return nvcc
    return None


def cuda_build_decision(env=os.environ) -> tuple[str | None, str]:
    """(nvcc, "") when the extension is to be built, else (None, the one line saying why not)."""
    if env.get("GAPKERN_NO_CUDA", "").strip() not in ("", "0"):
        return None, (f"gapkern: GAPKERN_NO_CUDA={env['GAPKERN_NO_CUDA']}: skipping the CUDA extension "
                      f"{EXTENSION}; installing the pure-Python package only")
    if not os.path.isfile(os.path.join(ROOT, "CMakeLists.txt")):
        return None, (f"gapkern: no CMakeLists.txt in this source tree: skipping the CUDA extension {EXTENSION}; "
                      "installing the pure-Python package only")
    nvcc = find_nvcc(env)
    if nvcc is None:
        return None, (f"gapkern: nvcc not found (PATH, CUDA_HOME): skipping the CUDA extension {EXTENSION}; "
                      "installing the pure-Python package only")
    return nvcc, ""


class CMakeExtension(Extension):
    def __init__(self, name: str, nvcc: str):
        super().__init__(name, sources=[])
        self.nvcc = nvcc


def extension_modules(env=os.environ, log=print) -> list:
    """The extensions to build: [] (after logging the one skip line) when CUDA is skipped."""
    nvcc, why = cuda_build_decision(env)
    if nvcc is None:
        log(why)
        return []
    return [CMakeExtension(EXTENSION, nvcc)]


def _tool(name: str, module: str) -> str:
    """cmake / ninja: on PATH (pip's build environment puts them there), else from their pip package."""
    found = shutil.which(name)
    if found:
        return found
    try:
        mod = __import__(module)
        return os.path.join(getattr(mod, "BIN_DIR", getattr(mod, "CMAKE_BIN_DIR", "")), name)
    except ImportError as exc:
        raise RuntimeError(f"gapkern: building {EXTENSION} needs {name} (pip install {name})") from exc


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja; the module lands where setuptools expects it."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        os.makedirs(build_dir, exist_ok=True)
        cmake = _tool("cmake", "cmake")
        configure = [
            cmake, "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'ninja')}",
            f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={os.path.dirname(target)}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("GAPKERN_CUDA_ARCHS"):
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['GAPKERN_CUDA_ARCHS']}")
        print(f"gapkern: building {EXTENSION} with {ext.nvcc}", flush=True)
        subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", build_dir, "--parallel", str(os.cpu_count() or 2)])
        if not os.path.isfile(target):
            raise RuntimeError(f"gapkern: CMake built no {os.path.basename(target)} in {os.path.dirname(target)}")


def _building() -> bool:
    return any(arg in _BUILD_COMMANDS for arg in sys.argv[1:])


if __name__ == "__main__":
    # Only the commands that build log the skip line (pip also runs egg_info and friends).
    setup(
        packages=find_packages(include=["gapkern", "gapkern.*"]) + list(PACKAGE_DIR),
        package_dir=PACKAGE_DIR,
        ext_modules=extension_modules(log=print if _building() else (lambda line: None)),
        cmdclass={"build_ext": CMakeBuild},
    )
