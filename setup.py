"""Build script. All metadata lives in pyproject.toml; this file only builds the optional native CPU extension.

``ring_attn._C`` (csrc/, C++17 + OpenMP, pybind11, no libtorch) is built through ``CMakeLists.txt`` with the
ninja generator, into the package directory (``pip install .``) or the source tree (``pip install -e .``).
The build is optional: without a C++ compiler, CMake, pybind11 or OpenMP, or when it fails, the install still
succeeds, this script prints why, and at runtime ring_attn warns once and runs CPU ops on the plain-torch
reference. ``RING_ATTN_NO_NATIVE=1`` skips the build on purpose.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _skip(reason: str) -> None:
    bar = "=" * 100
    print(f"\n{bar}\nring-attn: the native CPU extension ring_attn._C was NOT built: {reason}\n"
          "ring-attn installs without it; on CPU it then uses the (much slower) plain-torch reference and warns "
          "once at runtime.\nTo build it: install a C++17 compiler with OpenMP (e.g. g++), then reinstall "
          "(pip install -e . or pip install .).\n" + bar + "\n", file=sys.stderr, flush=True)


class CMakeBuild(build_ext):
    """Configure and build the extension with CMake + ninja; never fail the install."""

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("RING_ATTN_NO_NATIVE", "0") not in ("", "0"):
            _skip("RING_ATTN_NO_NATIVE is set")
            return
        try:
            self._build(ext)
        except Exception as exc:  # no compiler / cmake / pybind11 / OpenMP, or a compile error
            _skip(f"{type(exc).__name__}: {exc}")

    def _build(self, ext: Extension) -> None:
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed (it is in pyproject's build requirements)") from exc
        cmake = shutil.which("cmake")
        if cmake is None:
            try:
                import cmake as cmake_pkg  # the PyPI package ships a binary
                cmake = os.path.join(cmake_pkg.CMAKE_BIN_DIR, "cmake")
            except ImportError as exc:
                raise RuntimeError("cmake was not found") from exc
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "native")
        os.makedirs(build_dir, exist_ok=True)
        args = [cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                f"-DRING_ATTN_OUTPUT_DIR={out_dir}"]
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as ninja_pkg
                ninja = os.path.join(ninja_pkg.BIN_DIR, "ninja")
            except ImportError:
                ninja = None
        if ninja is not None:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            os.remove(os.path.join(build_dir, "CMakeCache.txt"))  # generator/compiler may differ between builds
        self._run(args)
        self._run([cmake, "--build", build_dir, "--parallel", str(max(1, os.cpu_count() or 1))])
        if not os.path.exists(self.get_ext_fullpath(ext.name)):
            raise RuntimeError(f"the build finished but {self.get_ext_fullpath(ext.name)} is missing")

    @staticmethod
    def _run(cmd) -> None:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.splitlines()[-25:])
            raise RuntimeError(f"`{' '.join(cmd[:2])} ...` failed (exit {proc.returncode}):\n{tail}")


setup(ext_modules=[CMakeExtension("ring_attn._C")], cmdclass={"build_ext": CMakeBuild})
