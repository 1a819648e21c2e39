"""Build hass_ext._C: the CPU kernels always, the CUDA kernels when they can be built.

HASS_BUILD_CUDA=auto (default): CUDA kernels when the installed torch is a CUDA build and nvcc is found.
HASS_BUILD_CUDA=1: CUDA kernels or a clear failure.  HASS_BUILD_CUDA=0: CPU kernels only.
Install with `pip install --no-build-isolation -e .` so the extension is built against the installed torch.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _fail(msg):
    sys.stderr.write(f"\nhass_ext build error: {msg}\n\n")
    raise SystemExit(1)


def _want_cuda(torch):
    mode = os.environ.get("HASS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        _fail(f"HASS_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    # Unset, torch raises on a machine without a GPU; on an H100 it would pick 9.0 without wgmma/TMA.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    nvcc = shutil.which("nvcc") or os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if not os.path.exists(nvcc):
        reasons.append(f"nvcc was not found on PATH nor in CUDA_HOME={os.environ['CUDA_HOME']}")
    if reasons:
        if mode == "1":
            _fail("HASS_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        return False
    return True


def _cutlass_include():
    """CUTLASS/CuTe headers: $CUTLASS_DIR, else the nvidia-cutlass wheel."""
    env = os.environ.get("CUTLASS_DIR")
    if env:
        inc = os.path.join(env, "include")
        return [inc if os.path.isdir(inc) else env]
    try:
        import cutlass_library  # noqa: F401  (headers only)

        base = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
        return [os.path.join(base, "include"), os.path.join(base, "tools", "util", "include")]
    except ImportError:
        return []


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # No FP traps are used; without them GCC can vectorise the selects in the CPU kernels' inner loops.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    link = ["-fopenmp"]
    if not _want_cuda(torch):
        return [CppExtension("hass_ext._C", sources, include_dirs=include,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=False)]
    sources += ["csrc/cuda_ops.cpp"] + sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    nvcc = ["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo",
            "-gencode", "arch=compute_90a,code=sm_90a"]
    return [CUDAExtension("hass_ext._C", sources, include_dirs=include + _cutlass_include(),
                          extra_compile_args={"cxx": cxx + ["-DHASS_WITH_CUDA"], "nvcc": nvcc},
                          extra_link_args=link)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


try:
    import torch  # noqa: F401
except ImportError:
    _fail("torch must be installed before building hass_ext (pip install torch), "
          "then install with: pip install --no-build-isolation -e .")

setup(
    name="hass_ext",
    version=VERSION,
    description="HASS speculative decoding for PyTorch: fused tree-attention, tree-verification and "
                "distillation-loss kernels, EAGLE/HASS drafts, training and generate()",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hass_ext", "hass_ext.*"]),
    package_data={"hass_ext": ["drafts/**/*"]},
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    install_requires=["torch", "transformers>=4.45", "safetensors", "tqdm", "gguf", "accelerate", "numpy"],
    entry_points={"console_scripts": ["hass-ext=hass_ext.cli:main"]},
    zip_safe=False,
)
