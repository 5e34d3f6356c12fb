"""Finds the CUDA toolkit the extension is compiled with, the way a user expects it to be found.

Order: ``CUDA_HOME``, then ``CUDA_PATH`` (taken as given: an incomplete one is an error), then the
toolkit of the ``nvcc`` on ``PATH`` (through symbolic links and wrapper scripts), then
``/usr/local/cuda``. A toolkit counts only when it has ``include/cuda_runtime.h`` (directly, or
under ``targets/<platform>/include`` as the split toolkit packages install it) and ``bin/nvcc``.

torch's own guess takes the directory two levels above the first ``nvcc`` on ``PATH``; where that
``nvcc`` is a small script that execs the real compiler (as package managers and module systems
install it), that directory has no headers and the build stops deep inside torch's headers.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

CONVENTIONAL_HOME = "/usr/local/cuda"
_RUNTIME_HEADER = "cuda_runtime.h"
# nvcc --dryrun prints the variables of its driver; TOP is the toolkit root, wherever nvcc was called from.
_DRYRUN_TOP = re.compile(r"^#\$ TOP=(.+)$", re.MULTILINE)
# An absolute path to an nvcc executable inside a wrapper script.
_SCRIPT_NVCC = re.compile(r"(/[^\s'\"`;|&<>]*/bin/nvcc)\b")


class ToolkitError(RuntimeError):
    """The toolkit that was found (or named) cannot build CUDA sources."""


@dataclass(frozen=True)
class Toolkit:
    home: str
    how_found: str  # "CUDA_HOME", "CUDA_PATH", "nvcc on PATH (<path>)" or "/usr/local/cuda"


def missing_parts(home: str) -> list[str]:
    """What a toolkit at ``home`` lacks to compile CUDA sources; empty when it is complete."""
    missing = []
    headers = [os.path.join(home, "include", _RUNTIME_HEADER)]
    headers += glob.glob(os.path.join(home, "targets", "*", "include", _RUNTIME_HEADER))
    if not any(os.path.isfile(h) for h in headers):
        missing.append(f"include/{_RUNTIME_HEADER}")
    if not os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        missing.append("bin/nvcc")
    return missing


def _home_of_nvcc_binary(nvcc: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _nvcc_named_by_script(path: str) -> str | None:
    """The nvcc a wrapper script execs, when it names one by an absolute path."""
    try:
        with open(path, "rb") as script:
            head = script.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for match in _SCRIPT_NVCC.finditer(head.decode("utf-8", "replace")):
        candidate = match.group(1)
        if os.path.realpath(candidate) != os.path.realpath(path) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _home_reported_by_nvcc(nvcc: str) -> str | None:
    """The toolkit root nvcc itself reports (``nvcc --dryrun``), for wrappers that compute the path."""
    try:
        result = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _DRYRUN_TOP.search(result.stdout + result.stderr)
    return os.path.normpath(match.group(1).strip()) if match else None


def home_of_nvcc(nvcc: str) -> str:
    """The toolkit root of an ``nvcc`` found on PATH, seen through links and wrapper scripts.

    Returns the best candidate even when it is incomplete, so an error can name it.
    """
    seen = set()
    current = nvcc
    while current not in seen:  # a wrapper may exec another wrapper
        seen.add(current)
        home = _home_of_nvcc_binary(current)
        if not missing_parts(home):
            return home
        named = _nvcc_named_by_script(os.path.realpath(current))
        if named is None:
            break
        current = named
    reported = _home_reported_by_nvcc(nvcc)
    if reported is not None and not missing_parts(reported):
        return reported
    return _home_of_nvcc_binary(current)


def _checked(home: str, how_found: str, hint: str) -> Toolkit:
    missing = missing_parts(home)
    if missing:
        raise ToolkitError(
            f"the CUDA toolkit at {home} (found through {how_found}) is incomplete: it has no "
            f"{' and no '.join(missing)}. {hint}"
        )
    return Toolkit(os.path.normpath(home), how_found)


_SET_CUDA_HOME = (
    "Set CUDA_HOME to the toolkit's root directory (the one whose include/ holds cuda_runtime.h and whose "
    "bin/ holds nvcc), or build without CUDA with EQUINORM_KERNELS_CUDA=0."
)


def find_toolkit(environ: dict[str, str] | None = None) -> Toolkit | None:
    """The CUDA toolkit to build with, or None when there is none.

    Raises:
        ToolkitError: the toolkit found (or named by CUDA_HOME / CUDA_PATH) is incomplete.
    """
    environ = os.environ if environ is None else environ
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(variable, "").strip()
        if home:
            return _checked(home, variable, f"Point {variable} at the toolkit's root directory, or unset it.")
    nvcc = shutil.which("nvcc", path=environ.get("PATH", os.defpath))
    if nvcc is not None:
        return _checked(home_of_nvcc(nvcc), f"nvcc on PATH ({nvcc})", _SET_CUDA_HOME)
    if os.path.isdir(CONVENTIONAL_HOME):
        return _checked(CONVENTIONAL_HOME, CONVENTIONAL_HOME, _SET_CUDA_HOME)
    return None
