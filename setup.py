"""Build script: compiles csrc/ into l2v_kernels._C when it can, else installs pure Python.

The extension is built when torch is a CUDA build (torch.version.cuda) and a CUDA toolkit with
nvcc is found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, else the nvcc on PATH); no GPU is needed to
build it. Otherwise the package installs without it (the Python fallbacks are used) and ONE line
says why.

Environment:
  L2V_SKIP_CUDA_BUILD=1   skip the extension
  L2V_REQUIRE_EXTENSION=1 a reason to skip the extension is an error instead (exit status 1):
                          bench/gpu_check.sh sets it, so a GPU run never measures the fallbacks
  L2V_CUDA_ARCHS          target architectures, default "90a;80" ("90a" -> sm_90a; "80+PTX"
                          also embeds compute_80 PTX)
  MAX_JOBS                parallel compile jobs (read by torch's BuildExtension)
  NVCC_THREADS            nvcc --threads (architectures compiled in parallel by one nvcc)

cuBLAS/cuSPARSE headers and libcublasLt: when the toolkit lacks them (a minimal nvcc install),
the ones of the `nvidia-*` wheels that torch itself depends on are used.

Install: pip install --no-build-isolation -e ".[test,bench]" (setup.py must see torch).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _say(message: str) -> None:
    print(f"[l2v setup] {message}", file=sys.stderr)


def _find_cuda_home() -> str | None:
    """The toolkit folder (the one holding bin/nvcc): CUDA_HOME, CUDA_PATH, /usr/local/cuda, then
    the nvcc found on PATH (its folder's parent, symbolic links resolved)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.isfile(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _nvcc_major(cuda_home: str) -> str | None:
    try:
        text = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", text)
    return match.group(1) if match else None


def _nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """include/ and lib/ folders of the installed nvidia-* wheels (site-packages/nvidia/*/)."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    includes, libs = [], []
    for root in roots:
        includes += sorted(glob.glob(os.path.join(root, "*", "include")))
        libs += sorted(glob.glob(os.path.join(root, "*", "lib")))
    return includes, libs


def _find_first(dirs: list[str], pattern: str) -> str | None:
    for d in dirs:
        hits = sorted(glob.glob(os.path.join(d, pattern)))
        if hits:
            return hits[0]
    return None


def _arch_flags(spec: str) -> list[str]:
    """'90a;80+PTX' -> -gencode flags: SASS for each, PTX too where '+PTX' is given."""
    flags = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        ptx = token.upper().endswith("+PTX")
        arch = token[:-4] if ptx else token
        arch = arch.replace(".", "").lower()
        if not re.fullmatch(r"\d+[a-z]?", arch):
            raise SystemExit(f"[l2v setup] L2V_CUDA_ARCHS: cannot parse {token!r} (e.g. '90a;80')")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def _extension_or_reason():
    """(ext_modules, cmdclass), or None and the one-line reason the extension is not built."""
    if os.environ.get("L2V_SKIP_CUDA_BUILD", "0") == "1":
        return None, "L2V_SKIP_CUDA_BUILD=1: not building the C++/CUDA extension (pure Python)"
    try:
        import torch
    except ImportError:
        return None, ("torch is not importable at build time: installing pure Python "
                      "(use pip install --no-build-isolation to build the extension)")
    if not torch.version.cuda:
        return None, f"torch {torch.__version__} is not a CUDA build: installing pure Python"
    cuda_home = _find_cuda_home()
    if cuda_home is None:
        return None, ("no CUDA toolkit found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on "
                      "PATH; set CUDA_HOME to a folder with bin/nvcc): installing pure Python")
    nvcc_major = _nvcc_major(cuda_home)
    torch_major = torch.version.cuda.split(".")[0]
    if nvcc_major != torch_major:
        return None, (f"nvcc in {cuda_home} is CUDA {nvcc_major}, torch was built with CUDA "
                      f"{torch.version.cuda}: installing pure Python")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first, so its
    # include and library paths point at the toolkit found here.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # Headers: the toolkit's first; the wheels' only fill in what it lacks (-idirafter), so a
    # full toolkit is used as is. Only the host compiler needs them (csrc/*.cpp).
    wheel_includes, wheel_libs = _nvidia_wheel_dirs()
    toolkit_include = os.path.join(cuda_home, "include")
    header_dirs = [toolkit_include] + wheel_includes
    for header in ("cublasLt.h", "cusparse.h"):
        if _find_first(header_dirs, header) is None:
            return None, (f"{header} not found in {toolkit_include} nor in the nvidia wheels: "
                          "installing pure Python")
    # Link cublasLt from the wheel torch loads (same soname), else from the toolkit.
    toolkit_libs = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    cublaslt = (_find_first(wheel_libs, "libcublasLt.so*")
                or _find_first(toolkit_libs, "libcublasLt.so*"))
    if cublaslt is None:
        return None, "libcublasLt.so not found in the nvidia wheels nor the toolkit: pure Python"

    cxx_flags = ["-O3", "-g0"] + [f"-idirafter{d}" for d in wheel_includes]
    nvcc_flags = ["-O3"]
    nvcc_flags += _arch_flags(os.environ.get("L2V_CUDA_ARCHS", "90a;80"))
    if os.environ.get("NVCC_THREADS"):
        nvcc_flags += ["--threads", os.environ["NVCC_THREADS"]]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    extension = CUDAExtension(
        name="l2v_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=[cublaslt, f"-Wl,-rpath,{os.path.dirname(cublaslt)}"],
    )
    return ([extension], {"build_ext": BuildExtension}), None


def main() -> None:
    build, reason = _extension_or_reason()
    if build is None:
        if os.environ.get("L2V_REQUIRE_EXTENSION", "0") == "1":
            _say(f"L2V_REQUIRE_EXTENSION=1 and the extension cannot be built: {reason}")
            raise SystemExit(1)
        _say(reason)
        setup()
        return
    ext_modules, cmdclass = build
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


if __name__ == "__main__":
    main()
