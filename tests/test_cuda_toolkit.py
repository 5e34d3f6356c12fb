"""How the build finds the CUDA toolkit (build_tools/cuda_toolkit.py), on fake toolkits in tmp_path."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from build_tools import cuda_toolkit  # noqa: E402
from build_tools.cuda_toolkit import ToolkitError, find_toolkit  # noqa: E402


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _toolkit(root: Path, *, split_headers: bool = False) -> Path:
    """A directory laid out as a CUDA toolkit: bin/nvcc and cuda_runtime.h."""
    include = root / ("targets/x86_64-linux/include" if split_headers else "include")
    include.mkdir(parents=True)
    (include / "cuda_runtime.h").write_text("")
    _executable(root / "bin" / "nvcc", "#!/bin/sh\necho nvcc\n")
    return root


@pytest.fixture
def no_conventional_home(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_toolkit, "CONVENTIONAL_HOME", str(tmp_path / "no-such-cuda"))


def test_cuda_home_is_taken_first(tmp_path):
    home = _toolkit(tmp_path / "cuda-12.8")
    found = find_toolkit({"CUDA_HOME": str(home), "CUDA_PATH": "/elsewhere", "PATH": ""})
    assert found.home == str(home) and found.how_found == "CUDA_HOME"


def test_cuda_path_when_cuda_home_is_unset(tmp_path):
    home = _toolkit(tmp_path / "cuda", split_headers=True)
    assert find_toolkit({"CUDA_PATH": str(home), "PATH": ""}).how_found == "CUDA_PATH"


def test_an_incomplete_cuda_home_is_an_error_naming_it(tmp_path):
    home = tmp_path / "half-installed"
    _executable(home / "bin" / "nvcc", "#!/bin/sh\n")
    with pytest.raises(ToolkitError, match=rf"{home}.*CUDA_HOME.*include/cuda_runtime.h.*Point CUDA_HOME"):
        find_toolkit({"CUDA_HOME": str(home), "PATH": ""})


def test_nvcc_on_path_through_a_symbolic_link(tmp_path, no_conventional_home):
    home = _toolkit(tmp_path / "opt" / "cuda-13.0")
    bin_dir = tmp_path / "usr" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").symlink_to(home / "bin" / "nvcc")
    found = find_toolkit({"PATH": str(bin_dir)})
    assert found.home == str(home) and str(bin_dir / "nvcc") in found.how_found


def test_nvcc_on_path_through_a_wrapper_script(tmp_path, no_conventional_home):
    # What torch guesses here: the directory two levels above the wrapper, which has no headers.
    home = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _executable(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    assert find_toolkit({"PATH": str(wrapper.parent)}).home == str(home)


def test_nvcc_on_path_through_two_wrappers(tmp_path, no_conventional_home):
    home = _toolkit(tmp_path / "cuda")
    inner = _executable(tmp_path / "inner" / "bin" / "nvcc", f'#!/bin/sh\nexec "{home}/bin/nvcc" "$@"\n')
    outer = _executable(tmp_path / "outer" / "bin" / "nvcc", f"#!/bin/sh\nexec {inner} \"$@\"\n")
    assert find_toolkit({"PATH": str(outer.parent)}).home == str(home)


def test_a_wrapper_that_computes_the_path_is_asked_with_dryrun(tmp_path, no_conventional_home):
    home = _toolkit(tmp_path / "cuda")
    # No absolute nvcc path in the script: only nvcc's own --dryrun output tells the root.
    wrapper = _executable(
        tmp_path / "module" / "bin" / "nvcc",
        f'#!/bin/sh\nroot="{tmp_path}"\necho "#\\$ TOP=$root/cuda/bin/.." >&2\n',
    )
    assert find_toolkit({"PATH": str(wrapper.parent)}).home == str(home)


def test_an_nvcc_without_headers_is_an_error_that_says_what_to_set(tmp_path, no_conventional_home):
    lonely = _executable(tmp_path / "lonely" / "bin" / "nvcc", "#!/bin/sh\n")
    with pytest.raises(ToolkitError, match=rf"{tmp_path / 'lonely'}.*nvcc on PATH.*Set CUDA_HOME"):
        find_toolkit({"PATH": str(lonely.parent)})


def test_the_conventional_location_when_no_nvcc_is_on_path(tmp_path, monkeypatch):
    home = _toolkit(tmp_path / "usr-local-cuda")
    monkeypatch.setattr(cuda_toolkit, "CONVENTIONAL_HOME", str(home))
    assert find_toolkit({"PATH": str(tmp_path / "empty")}).home == str(home)


def test_no_toolkit_anywhere(tmp_path, no_conventional_home):
    assert find_toolkit({"PATH": str(tmp_path / "empty")}) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH")
def test_this_machines_toolkit_has_the_runtime_headers():
    found = find_toolkit({k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")})
    assert found is not None and not cuda_toolkit.missing_parts(found.home)
