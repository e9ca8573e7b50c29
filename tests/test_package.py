"""The package as a user meets it: imports from outside the tree, the CLI, backend dispatch."""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

import d2nwg
from d2nwg import _ext
from d2nwg.backends import Backend, compiled_reason, select
from d2nwg.cli import main


def run_outside(code: str, tmp_path) -> subprocess.CompletedProcess:
    """Run Python in an empty directory, so nothing is imported from the source tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_kernels_import_as_d2nwg_kernels_not_top_level(tmp_path):
    res = run_outside(
        "import importlib.util, d2nwg.kernels, d2nwg.kernels.tokenize as k\n"
        "print(importlib.util.find_spec('kernels'))\n"
        "print(k.__name__)\n",
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "d2nwg.kernels.tokenize"]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_dist(tmp_path, command: str, pattern: str):
    """Build a distribution (``sdist`` / ``bdist_wheel``) of a copy of the tree without build
    state (an old egg-info's SOURCES.txt would feed the file list); no compiler needed."""
    skip = (".*", "*.egg-info", "build", "dist", "__pycache__", "*.so", "bench", "docs", "tests")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*skip))
    res = subprocess.run(
        [sys.executable, "setup.py", "-q", command, "--dist-dir", str(tmp_path)],
        cwd=tree,
        env={**os.environ, "D2NWG_NO_EXT": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    (archive,) = tmp_path.glob(pattern)
    return archive


def test_sdist_holds_every_extension_source(tmp_path):
    """A user building from the sdist needs the headers and CUDA sources too (setuptools adds
    neither on its own: MANIFEST.in does)."""
    with tarfile.open(build_dist(tmp_path, "sdist", "d2nwg-*.tar.gz")) as tar:
        shipped = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    sources = {f"csrc/{f}" for f in os.listdir(os.path.join(ROOT, "csrc"))}
    assert {"csrc/ops.h", "csrc/tokenize_cuda.cu"} <= sources
    assert sources - shipped == set()


def test_wheel_holds_every_python_module(tmp_path):
    """Every module of the source tree lands in a built wheel (a subpackage missing from
    setup.py's list would import from a checkout and fail after pip install)."""
    with zipfile.ZipFile(build_dist(tmp_path, "bdist_wheel", "d2nwg-*.whl")) as z:
        shipped = {n for n in z.namelist() if n.endswith(".py")}
    expected = {
        os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
        for top in ("d2nwg", "kernels")
        for d, _, files in os.walk(os.path.join(ROOT, top))
        for f in files
        if f.endswith(".py")
    }
    expected = {"d2nwg/" + p if p.startswith("kernels/") else p for p in expected}
    assert {"d2nwg/generator/facade.py", "d2nwg/kernels/tokenize.py"} <= expected
    assert expected - shipped == set()


def test_info_lists_every_backend_with_a_reason(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"d2nwg {d2nwg.__version__}" in out and torch.__version__ in out
    for name in ("torch", "cpp", "cuda", "triton", "xformers"):
        assert f"  {name}" in out
    assert "tokenize" in out  # the ops table
    assert "CUDA archs" in out or "d2nwg._C: built" not in out  # the build line, when built
    if not torch.cuda.is_available():
        assert "cuda      unavailable:" in out


def test_extension_carries_the_gpu_code_it_claims():
    """With CUDA ops built (make test does, for 8.0;9.0), the binary holds that machine code."""
    from d2nwg import _ext

    if _ext.IMPORT_ERROR is not None:
        pytest.skip(_ext.IMPORT_ERROR)
    info = _ext.build_info()
    found = _ext.machine_code_archs()
    if not info["with_cuda"]:
        # A CUDA build of torch with a toolkit at hand must have built the CUDA ops (make
        # build sets FORCE_CUDA=1); only then is "no GPU code" the right answer.
        import shutil

        assert not (torch.version.cuda and shutil.which("nvcc")), "CUDA ops were not built"
        assert found == []
        return
    for arch in info["cuda_archs"]:
        digits = arch.replace("+PTX", "").replace(".", "")
        assert f"sm_{digits}" in found, (arch, found)


def test_select_forced_backend_lists_every_reason(monkeypatch):
    x = torch.zeros(3)
    backends = (
        Backend("cuda", lambda x: "cuda", lambda x: "needs CUDA tensors"),
        Backend("cpp", lambda x: "cpp", lambda x: "not built"),
        Backend("torch", lambda x: "torch", lambda x: None),
    )
    assert select("op", backends, x).name == "torch"
    with pytest.raises(d2nwg.BackendUnavailableError) as info:
        select("op", backends, x, backend="cpp")
    message = str(info.value)
    assert "cuda: needs CUDA tensors" in message and "cpp: not built" in message
    assert "torch: can run" in message
    with pytest.raises(d2nwg.ConfigError, match="unknown backend"):
        select("op", backends, x, backend="tpu")
    with pytest.raises(d2nwg.BackendUnavailableError, match="no 'triton' backend"):
        select("op", backends, x, backend="triton")
    # The environment variable steers the ops that have that backend and is ignored by others.
    monkeypatch.setenv("D2NWG_BACKEND", "triton")
    assert select("op", backends, x).name == "torch"
    monkeypatch.setenv("D2NWG_BACKEND", "cpp")
    with pytest.raises(d2nwg.BackendUnavailableError, match="cpp: not built"):
        select("op", backends, x)


def test_triton_interpreter_only_when_forced():
    backends = (
        Backend("triton", lambda x: "triton", lambda x: None),
        Backend("torch", lambda x: "torch", lambda x: None),
    )
    assert select("op", backends, torch.zeros(2)).name == "torch"
    assert select("op", backends, torch.zeros(2), backend="triton").name == "triton"


def test_compiled_backends_need_their_device_and_their_ops():
    x = torch.zeros(2)
    assert compiled_reason("cuda", "sampler_step_")(x) == "needs CUDA tensors, got cpu"
    if _ext.cpp_reason() is not None:  # no extension: that is the reason
        assert compiled_reason("cpu", "no_such_op_")(x) == _ext.cpp_reason()
        return
    for op in ("sampler_step_", "tokenize_", "detokenize_"):
        assert compiled_reason("cpu", op)(x, "other", "inputs") is None
    reason = compiled_reason("cpu", "tokenize_", "no_such_op_")(x)
    assert reason == "d2nwg._C was built without no_such_op_ (rebuild it)"


def test_gpu_suite_runs_tiny_on_cpu(tmp_path):
    """The GPU suite is known to work before a GPU is at hand."""
    suite = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_suite.py"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, suite, "--tiny", "--no-build", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    written = sorted(os.listdir(tmp_path))
    assert [f.rsplit(".", 1)[-1] for f in written] == ["json", "md"], written
    table = open(os.path.join(tmp_path, written[1])).read()
    assert "| tokenize |" in table and "FAIL" not in table
