"""The distributable wheels, as a user gets them: scripts/build_wheels.sh builds a CPU and a CUDA wheel into dist/;
each is installed into a fresh venv together with the torch its metadata pins, then imported there, its ops
listed and the documented examples run on the CPU; the CUDA wheel must hold sm_90a code for every kernel of
csrc/cuda. Slow (two venvs with torch, a CUDA build): HASS_SKIP_WHEEL_TESTS=1 skips this file.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

slow_wheel_test = pytest.mark.skipif(os.environ.get("HASS_SKIP_WHEEL_TESTS") == "1",
                                     reason="HASS_SKIP_WHEEL_TESTS=1")

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "wheels"
DIST = ROOT / "dist"
SOURCES = ("csrc", "hass_ext", "hass_ext_cli.py", "setup.py", "pyproject.toml", "README.md")
# What each wheel's version tag and torch pin must say (scripts/build_wheels.sh builds them this way).
KINDS = {"cpu": ("+cpu.torch", None), "cuda": ("+cu", "cuda")}


def _git_files():
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", *SOURCES],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [ROOT / f for f in out.split("\0") if f and (ROOT / f).exists()]


def _wheel(kind):
    found = sorted(DIST.glob(f"hass_ext-*{KINDS[kind][0]}*.whl"), key=os.path.getmtime)
    return found[-1] if found else None


def _run(cmd, timeout, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheels():
    """dist/'s wheels when both are newer than every source file, else freshly built."""
    newest_source = max(os.path.getmtime(f) for f in _git_files())
    have = {k: _wheel(k) for k in KINDS}
    if not all(w and os.path.getmtime(w) > newest_source for w in have.values()):
        env = dict(os.environ)
        if "CPU_PYTHON" not in env and torch.version.cuda is None:
            env["CPU_PYTHON"] = sys.executable  # the CPU torch this suite runs on
        _run(["bash", "scripts/build_wheels.sh", "all"], timeout=3600, cwd=ROOT, env=env)
        have = {k: _wheel(k) for k in KINDS}
    assert all(have.values()), f"scripts/build_wheels.sh left no wheel for {[k for k, w in have.items() if not w]}"
    return have


def _fresh_venv(kind, wheel, extra=()):
    """A new venv with the wheel and what its metadata requires (the pinned torch included)."""
    venv = WORK / f"venv-test-{kind}"
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(wheel), *extra], timeout=1800)
    return py


_PROBE = """
import importlib.metadata as md, json, torch, hass_ext
from hass_ext.oracles import compact_kv_oracle
cache = torch.randn(2, 3, 9, 4)
expected = cache.clone()
src, dst = torch.tensor([[4, 6], [8, -1]]), torch.tensor([1, 2])
compact_kv_oracle([expected], src, dst)
torch.ops.hass.compact_kv([cache], src, dst)  # the raw op, registered by `import hass_ext` alone
print(json.dumps({
    "file": hass_ext.__file__, "version": md.version("hass_ext"), "requires": md.requires("hass_ext"),
    "torch": torch.__version__, "torch_cuda": torch.version.cuda, "ops": hass_ext.registered_ops(),
    "op_devices": hass_ext.op_devices(), "report": hass_ext.kernel_report(),
    "cuda_kernels": {op: torch._C._dispatch_has_kernel_for_dispatch_key("hass::" + op, "CUDA")
                     for op in hass_ext.registered_ops()},
    "compact_kv_ok": torch.equal(cache, expected)}))
"""


def _probe(py, tmp_path):
    # run outside the checkout so that only the installed package can be imported
    out = _run([str(py), "-c", _PROBE], timeout=600, cwd=tmp_path)
    return json.loads(out.strip().splitlines()[-1])


def _check_install(kind, py, info, tmp_path):
    venv = py.parent.parent
    assert Path(info["file"]).resolve().is_relative_to(venv.resolve()), info["file"]
    tag, torch_cuda = KINDS[kind]
    assert tag in info["version"], info["version"]
    torch_release = info["torch"].split("+")[0]
    major_minor = ".".join(torch_release.split(".")[:2])
    assert info["version"].endswith(f".torch{major_minor}"), (info["version"], info["torch"])
    assert f"torch=={torch_release}" in info["requires"], info["requires"]
    assert (info["torch_cuda"] is not None) == (torch_cuda == "cuda"), info
    assert "compact_kv" in info["ops"] and info["compact_kv_ok"]
    assert all("cpu" in d for op, d in info["op_devices"].items() if not op.endswith("_backward")), info
    # the documented examples, on the CPU, against the installed package
    out = _run([str(py), str(ROOT / "tests" / "doc_examples.py"), str(ROOT / "docs" / "kernels.md")],
               timeout=1200, cwd=tmp_path)
    assert re.search(r"examples: [1-9]\d* passed, 0 failed", out), out


@slow_wheel_test
def test_cpu_wheel(wheels, tmp_path):
    py = _fresh_venv("cpu", wheels["cpu"])
    info = _probe(py, tmp_path)
    _check_install("cpu", py, info, tmp_path)
    assert not any(info["cuda_kernels"].values()), info["cuda_kernels"]
    assert "CPU-only build" in info["report"], info["report"]
    # the console script: its help lists every command
    out = _run([str(py.parent / "hass-ext"), "--help"], timeout=120, cwd=tmp_path)
    assert "generate" in out and "token-map" in out, out


def _cuobjdump(venv):
    for tool in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump",
                 *venv.glob("lib/python*/site-packages/nvidia/cu*/bin/cuobjdump")):
        if tool.exists():
            return tool
    pytest.fail("no cuobjdump: neither the CUDA toolkit's nor the nvidia-cuda-cuobjdump package's")


def kernel_names(root=ROOT):
    """Base names of the __global__ functions defined in csrc/cuda/*.cu."""
    names = set()
    for cu in sorted((root / "csrc" / "cuda").glob("*.cu")):
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", cu.read_text(), flags=re.S)
        text = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", text)
        names.update(re.findall(r"\w+", decl)[-1] for decl in re.findall(r"__global__\s+([^(;{]*?)\(", text))
    return names


def _demangle(symbols):
    if not symbols:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(symbols), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _base_name(demangled):
    """'void (anonymous namespace)::k<float, 4>(float*, int)' -> 'k'; an extern "C" kernel is its own name."""
    s = demangled.replace("(anonymous namespace)::", "")
    m = re.search(r"(\w+)\s*[<(]", s)
    return m.group(1) if m else s.strip()


@slow_wheel_test
def test_cuda_wheel(wheels, tmp_path):
    extra = [] if (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump").exists() else [
        "nvidia-cuda-cuobjdump>=13,<14"]
    py = _fresh_venv("cuda", wheels["cuda"], extra)
    info = _probe(py, tmp_path)
    _check_install("cuda", py, info, tmp_path)
    assert info["cuda_kernels"]["compact_kv"], info["cuda_kernels"]
    if not torch.cuda.is_available():
        assert "no CUDA device is visible" in info["report"], info["report"]

    venv = py.parent.parent
    (so,) = venv.glob("lib/python*/site-packages/hass_ext/_C*.so")
    tool = _cuobjdump(venv)
    elf = _run([str(tool), "--list-elf", str(so)], timeout=300)
    cubins = re.findall(r"ELF file\s+\d+:\s*(\S+)", elf)
    assert cubins, elf
    assert all(c.endswith(".sm_90a.cubin") for c in cubins), elf
    usage = _run([str(tool), "--dump-resource-usage", str(so)], timeout=300)
    assert set(re.findall(r"^\s*arch = (\S+)", usage, re.M)) == {"sm_90a"}, usage
    functions = {_base_name(d) for d in _demangle(re.findall(r"^\s*Function ([^\s:]+):", usage, re.M))}
    expected = kernel_names()
    assert expected, "no __global__ kernel found in csrc/cuda/*.cu"
    assert expected <= functions, f"kernels without sm_90a code in {so.name}: {sorted(expected - functions)}"


def test_kernel_names_parser(tmp_path):
    """The source scan above finds templated, launch-bounded and extern "C" kernels by their base names."""
    src = ('template <typename T, int N>\n__global__ void __launch_bounds__(256, 2) alpha_kernel(T* x) {}\n'
           'extern "C" __global__ void beta(float* y) {}\n// __global__ void commented_out() {}\n'
           'static __global__ __launch_bounds__(128) void gamma_k(int n) {}\n')
    (tmp_path / "csrc" / "cuda").mkdir(parents=True)
    (tmp_path / "csrc" / "cuda" / "x.cu").write_text(src)
    assert kernel_names(tmp_path) == {"alpha_kernel", "beta", "gamma_k"}
    assert _base_name("void (anonymous namespace)::alpha_kernel<float, 4>(float*)") == "alpha_kernel"
    assert _base_name("void hass::detail::beta<unsigned long>(unsigned long*, long const*)") == "beta"
    assert _base_name("beta") == "beta"

