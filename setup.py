"""Build hook for the optional C++/CUDA extension `peft_fast._C` (csrc/).

Install after torch, without build isolation, so the extension is built against the torch
you run: `pip install -e . --no-build-isolation`. The extension is optional at run time
(peft_fast/_segments.py falls back to torch), so:

- `PEFT_FAST_SKIP_CPP=1` installs the pure-Python package without building it;
- when torch is not importable at build time, or the compile fails, the install still
  succeeds without the extension, after a loud warning.

CUDA kernels (csrc/*.cu) are compiled only when torch was built with CUDA and nvcc is found
(CUDA_HOME); otherwise the extension has CPU kernels only.
"""
import os
import sys
import traceback
from glob import glob

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "peft_fast._C"
FAILED_MARKER = "_C_BUILD_FAILED"  # written into the package when the compile fails


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def _warn(msg: str) -> None:
    bar = "!" * 88
    print(f"\n{bar}\nWARNING (peft_fast): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _extension_setup() -> dict:
    """setup() keyword arguments for the extension ({} when it is not built)."""
    if _flag("PEFT_FAST_SKIP_CPP"):
        print("peft_fast: PEFT_FAST_SKIP_CPP=1, not building the C++ extension", file=sys.stderr)
        # An earlier in-place (editable) build would otherwise still be imported.
        pkg = os.path.join(ROOT, "peft_fast")
        for path in glob(os.path.join(pkg, "_C.*.so")) + glob(os.path.join(pkg, "_C.*.pyd")) \
                + glob(os.path.join(pkg, FAILED_MARKER)):
            print(f"peft_fast: removing {os.path.relpath(path, ROOT)} (an earlier build)", file=sys.stderr)
            os.remove(path)
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch in the build environment (e.g. build isolation)
        _warn(f"torch is not importable at build time ({exc!r}); installing without the C++ extension "
              "peft_fast._C (torch fallback). Install torch first, then `pip install --no-build-isolation .`")
        return {}

    sources = sorted(glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob(os.path.join("csrc", "*.cu")))
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    with_cuda = bool(torch.version.cuda) and bool(cu_sources) and nvcc is not None and os.path.exists(nvcc)
    # -g0: Python's CFLAGS add -g, which doubles the compile time and bloats the object 30x.
    cxx_args = ["-O3", "-g0"]
    if with_cuda:
        extension_cls = cpp_extension.CUDAExtension
        sources += cu_sources
        cxx_args.append("-DPEFT_FAST_WITH_CUDA")
        compile_args = {"cxx": cxx_args, "nvcc": ["-O3", "-DPEFT_FAST_WITH_CUDA"]}
    else:
        extension_cls = cpp_extension.CppExtension
        compile_args = {"cxx": cxx_args}
    print(f"peft_fast: building {EXT_NAME} ({'CPU + CUDA' if with_cuda else 'CPU only'}) against torch "
          f"{torch.__version__}", file=sys.stderr)
    ext = extension_cls(EXT_NAME, sources, include_dirs=[os.path.join(ROOT, "csrc")],
                        depends=sorted(glob(os.path.join("csrc", "*.h"))), extra_compile_args=compile_args)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """torch's BuildExtension, but a failed build warns and installs without the extension.

        pip shows a build's output only with -v, so a failure also leaves the marker file
        peft_fast/_C_BUILD_FAILED in the installed package: peft_fast/_segments.py warns at
        import time that the torch fallback is in use.
        """

        def run(self):
            self._in_place = self.inplace or getattr(self, "editable_mode", False)  # run() resets inplace
            super().run()

        def _package_dir(self) -> str:
            return os.path.join(ROOT, "peft_fast") if self._in_place else os.path.join(self.build_lib, "peft_fast")

        def build_extensions(self):
            marker = os.path.join(self._package_dir(), FAILED_MARKER)
            try:
                super().build_extensions()
            except Exception:  # compiler missing or failing, ABI check, ninja error, ...
                error = traceback.format_exc(limit=3)
                _warn("building the C++ extension peft_fast._C failed; installing WITHOUT it. "
                      "peft_fast still works (pure-torch fallback for the mixed-batch ops), only slower.\n"
                      + error + "Fix the toolchain and reinstall, or set PEFT_FAST_SKIP_CPP=1 to skip the build.")
                os.makedirs(os.path.dirname(marker), exist_ok=True)
                with open(marker, "w") as f:
                    f.write(error)
                if self._in_place:  # an editable install must not keep loading an older build
                    stale = os.path.join(ROOT, self.get_ext_filename(EXT_NAME))
                    if os.path.exists(stale):
                        os.remove(stale)
                # Nothing built: later steps (in-place copies, the wheel's file list) skip it.
                self.extensions = []
            else:
                if os.path.exists(marker):
                    os.remove(marker)

    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExt}}


setup(**_extension_setup())
