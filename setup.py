"""Build hass_ext._C: the CPU kernels always, the CUDA kernels when they can be built.

HASS_BUILD_CUDA=auto (default): CUDA kernels when the installed torch is a CUDA build and nvcc is found.
HASS_BUILD_CUDA=1: CUDA kernels or a clear failure.  HASS_BUILD_CUDA=0: CPU kernels only.
Install with `pip install --no-build-isolation -e .` so the extension is built against the installed torch.
The version carries a local tag naming the build (0.1.0+cpu.torch2.13, 0.1.0+cu130.torch2.14) and the
package requires exactly the torch it was compiled against; scripts/build_wheels.sh builds both wheels.
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
    # Unset, torch raises on a machine without a GPU. 9.0a (Hopper with its arch-specific instructions) is the
    # one target the kernels are written and tested for.
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


def _cuda_library_headers(torch):
    """Header dirs of the CUDA math libraries shipped with a CUDA torch (site-packages/nvidia/*/include).

    ATen/cuda/CUDAContext.h includes cuBLAS/cuSPARSE headers; a cut-down toolkit may lack them. They are
    searched after every other include dir (-idirafter) so the toolkit's own headers always win.
    """
    if os.path.exists(os.path.join(os.environ["CUDA_HOME"], "include", "cublas_v2.h")):
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs = sorted(d for d in glob.glob(os.path.join(site, "nvidia", "*", "include"))
                  if os.path.exists(os.path.join(d, "cublas_v2.h")) or os.path.exists(os.path.join(d, "cusparse.h")))
    return [arg for d in dirs for arg in ("-idirafter", d)]


def extensions(torch, cuda):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    include = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
    # No FP traps are used; without them GCC can vectorise the selects in the CPU kernels' inner loops.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    link = ["-fopenmp"]
    if not cuda:
        return [CppExtension("hass_ext._C", sources, include_dirs=include,
                             extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=False)]
    # csrc/cuda: the kernels (*.cu, no torch) and beside each its host binding (*_ops.cpp).
    sources += sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)) + sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
    nvcc = ["-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo",
            "-gencode", "arch=compute_90a,code=sm_90a"]
    cxx_cuda = cxx + ["-DHASS_WITH_CUDA"] + _cuda_library_headers(torch)
    return [CUDAExtension("hass_ext._C", sources, include_dirs=include,
                          extra_compile_args={"cxx": cxx_cuda, "nvcc": nvcc}, extra_link_args=link)]


def version(torch, cuda):
    """VERSION plus a local tag naming the build: 0.1.0+cpu.torch2.13 or 0.1.0+cu130.torch2.14.

    The extension links against torch's C++ ABI, which changes between torch releases, so the tag (and the
    wheel's file name) says which torch and which device kernels it holds.
    """
    major, minor = torch_release(torch).split(".")[:2]
    kind = "cu" + torch.version.cuda.replace(".", "") if cuda else "cpu"
    return f"{VERSION}+{kind}.torch{major}.{minor}"


def torch_release(torch):
    """The installed torch's public version (2.13.0 for 2.13.0+cpu): the exact torch a built wheel requires."""
    return torch.__version__.split("+", 1)[0]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


try:
    import torch
except ImportError:
    _fail("torch must be installed before building hass_ext (pip install torch), "
          "then install with: pip install --no-build-isolation -e .")

BUILD_CUDA = _want_cuda(torch)

setup(
    name="hass_ext",
    version=version(torch, BUILD_CUDA),
    description="HASS speculative decoding for PyTorch: fused tree-attention, tree-verification and "
                "distillation-loss kernels, EAGLE/HASS drafts, training and generate()",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(
        os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["hass_ext", "hass_ext.*"]),
    py_modules=["hass_ext_cli"],  # the console script: answers --help without importing torch
    package_data={"hass_ext": ["drafts/**/*", "data/eval/*"]},
    ext_modules=extensions(torch, BUILD_CUDA),
    cmdclass=cmdclass(),
    # the exact torch the extension was compiled against (2.13.0 also matches 2.13.0+cpu)
    install_requires=[f"torch=={torch_release(torch)}", "transformers>=4.45", "safetensors", "tqdm", "gguf",
                      "accelerate", "numpy"],
    entry_points={"console_scripts": ["hass-ext=hass_ext_cli:main"]},
    zip_safe=False,
)
