"""Packaging: the extension build, graceful degradation without it, backend discovery."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import equinorm_kernels as ek

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_extension_is_built_against_the_running_torch():
    info = ek.build_info()
    assert info["compiled"], info["error"]
    assert info["torch_version"] == torch.__version__
    assert info["with_cuda"] == (torch.version.cuda is not None and info["cuda_arch_list"] != "")


def _schema_op_names() -> list[str]:
    """The ops csrc/ops.cpp declares (read from the source, not from the dispatcher)."""
    import re

    with open(os.path.join(ROOT, "csrc", "ops.cpp")) as source:
        names = re.findall(r'm\.def\(\s*"(\w+)\(', source.read())
    assert names, "no op schema found in csrc/ops.cpp"
    return names


@pytest.mark.parametrize("dispatch_key", ["CPU", "CUDA"])
def test_every_op_of_the_schema_has_a_kernel_for_each_backend_built(dispatch_key):
    info = ek.build_info()
    if dispatch_key == "CUDA" and not info["with_cuda"]:
        pytest.skip("built without CUDA")
    # A composite kernel (the ops composed of others, equinorm_forward_autograd and its reference
    # backward) serves every backend.
    served_by = (dispatch_key, "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    missing = [
        name for name in _schema_op_names()
        if not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"equinorm_kernels::{name}", key) for key in served_by)
    ]
    assert not missing, f"no {dispatch_key} kernel registered for {missing}"


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="torch's parallel_for is OpenMP on Linux builds only")
def test_cpu_kernels_are_built_to_run_on_torchs_openmp_threads():
    # at::parallel_for is a header template: compiled without -fopenmp it runs on one thread, and
    # the extension then never calls into the OpenMP runtime. Nor must it bring a runtime of its own.
    from equinorm_kernels import _C

    symbols = subprocess.run(["nm", "-D", "--undefined-only", _C.__file__], capture_output=True, text=True, check=False)
    if symbols.returncode != 0:
        pytest.skip(f"nm could not read the extension: {symbols.stderr.strip()}")
    assert "GOMP_parallel" in symbols.stdout
    needed = subprocess.run(["readelf", "-d", _C.__file__], capture_output=True, text=True, check=False).stdout
    assert "gomp" not in needed and "libomp" not in needed, needed


def test_import_without_extension_warns_and_keeps_reference_backend():
    result = _run(
        """
        import importlib.abc, importlib.machinery, sys, warnings

        class BrokenExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # Stands for an extension built against another torch: found, but fails to load.
            def find_spec(self, name, path=None, target=None):
                if name == "equinorm_kernels._C":
                    return importlib.machinery.ModuleSpec(name, self)
                return None

            def create_module(self, spec):
                raise ImportError("undefined symbol: _ZN2at6Tensor")

            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, BrokenExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import equinorm_kernels as ek
        messages = [str(w.message) for w in caught]
        assert any("only the 'reference' backend" in m and "undefined symbol" in m for m in messages), messages
        assert ek.build_info()["compiled"] is False
        assert ek.available_backends("cpu") == ["reference"]
        import torch
        layer = ek.EquiNormConv2d(3, 4, 3, padding=1)
        assert torch.isfinite(layer(torch.rand(2, 3, 5, 5))).all()
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), torch.zeros(1), "meta"])
def test_available_backends_end_with_the_reference_fallback(device):
    names = ek.available_backends(device)
    assert names[-1] == "reference"
    assert len(names) == len(set(names))


def test_available_backends_rejects_a_bad_device():
    with pytest.raises(ValueError, match="device"):
        ek.available_backends("not-a-device")


def test_setup_reports_skipped_cuda_build():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "skipping compilation of CUDA extensions" in result.stdout
    assert "not a CUDA build" in result.stdout


def test_setup_refuses_forced_cuda_without_cuda_torch():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        env={**os.environ, "EQUINORM_KERNELS_CUDA": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "EQUINORM_KERNELS_CUDA=1" in result.stderr
