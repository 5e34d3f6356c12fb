"""The Triton kernels as a GPU runs them, checked without one.

Under the interpreter (which the other suites run the kernels with) every int argument is a
tensor and every float a Python float. Compiled, Triton's launcher turns an int equal to 1 into a
constant and types each int by its size, and Inductor's code for a traced ``triton_op`` passes
floats as float32. The compiled checks run in a subprocess, since this process defines the kernels
for the interpreter (tests/conftest.py); the scalar checks run the interpreted kernels with float
arguments typed as Inductor types them.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import equinorm_kernels
from equinorm_kernels import functional, reference
from equinorm_kernels import triton as triton_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def compiled_mode(tmp_path):
    """Runs a script in a Python whose Triton kernels are compiled (no TRITON_INTERPRET). A script
    file, not ``-c``: Triton reads the source of a kernel from its file."""
    pytest.importorskip("triton")

    def run(code: str) -> subprocess.CompletedProcess:
        script = tmp_path / "script.py"
        script.write_text(textwrap.dedent(code))
        environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
        return subprocess.run(
            [sys.executable, str(script)], cwd=ROOT, env=environment,
            capture_output=True, text=True, timeout=300, check=False,
        )

    return run


def _assert_prints_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok"), result.stdout + result.stderr


# ---- specialisations as Triton's launcher makes them, compiled for sm_90 ----

def test_one_input_channel_is_specialised_as_a_constant_and_compiles(compiled_mode):
    """A grayscale input (C = 1): ``channels`` reaches the channel-sum kernel as the constant 1."""
    _assert_prints_ok(compiled_mode(
        """
        import torch
        from equinorm_kernels.triton import compile_check

        recorder = compile_check.LaunchRecorder()
        with recorder.recording():
            torch.ops.equinorm_kernels.triton_channel_mean(torch.rand(4, 1, 5, 6), 4, "mean")
            torch.ops.equinorm_kernels.triton_channel_mean(torch.rand(4, 16, 5, 6), 4, "mean")
        one, sixteen = recorder.launches.values()
        backend = compile_check.backend_for(90)
        source, _ = compile_check.compile_source(one, backend)
        index = list(source.signature).index("channels")
        assert source.signature["channels"] == "constexpr" and source.constants[(index,)] == 1, source.signature
        source, _ = compile_check.compile_source(sixteen, backend)
        assert source.signature["channels"] == "i32", source.signature
        assert source.attrs[(index,)] == [["tt.divisibility", 16]], source.attrs
        for launch in (one, sixteen):
            compile_check.compile_launch(launch, 90)
        print("ok")
        """
    ))


def test_every_kernel_of_the_quick_sample_takes_ints_not_floats(compiled_mode):
    """A float argument would reach the kernel at a precision that depends on the launch path."""
    _assert_prints_ok(compiled_mode(
        """
        from equinorm_kernels.triton import compile_check

        recorder = compile_check.record_sample_launches(quick=True)
        backend = compile_check.backend_for(90)
        names = set()
        for launch in recorder.launches.values():
            source, _ = compile_check.compile_source(launch, backend)
            floats = {name: kind for name, kind in source.signature.items() if kind.startswith(("fp", "bf"))}
            assert not floats, (launch.name, floats)
            names.add(launch.name)
        assert names == set(compile_check.STRIDE_ARGUMENTS), names ^ set(compile_check.STRIDE_ARGUMENTS)
        print("ok")
        """
    ))


def test_a_stride_multiplied_in_32_bits_is_found_and_no_kernel_has_one(compiled_mode):
    """Offsets past 2**31 without a giant tensor: the compiled code is read for 32-bit products
    of the stride arguments, on a kernel with one and on each kernel with every stride an int32."""
    _assert_prints_ok(compiled_mode(
        """
        import triton
        import triton.language as tl
        from triton.compiler import ASTSource

        from equinorm_kernels.triton import compile_check

        @triton.jit
        def rows(values_ptr, out_ptr, count, stride, WIDE: tl.constexpr):
            total = tl.full([], 0, tl.float32)
            for r in range(count):
                if WIDE:
                    total += tl.load(values_ptr + tl.cast(r, tl.int64) * stride)
                else:
                    total += tl.load(values_ptr + r * stride)
            tl.store(out_ptr, total)

        target = compile_check.backend_for(90).target
        signature = {"values_ptr": "*fp32", "out_ptr": "*fp32", "count": "i32", "stride": "i32", "WIDE": "constexpr"}
        for wide in (False, True):
            ttir = triton.compile(ASTSource(rows, signature, {"WIDE": wide}), target=target).asm["ttir"]
            found = compile_check.narrow_products(ttir, ("stride",))
            assert bool(found) != wide, (wide, found)

        # One launch of each kernel, every stride made an int32 that no specialisation folds.
        firsts = {}
        for launch in compile_check.record_sample_launches(quick=True).launches.values():
            firsts.setdefault(launch.name, launch)
        assert set(firsts) == set(compile_check.STRIDE_ARGUMENTS), set(firsts)
        for name, launch in firsts.items():
            strides = compile_check.STRIDE_ARGUMENTS[name]
            names = launch.kernel.arg_names
            args = tuple(3 if parameter in strides else value for parameter, value in zip(names, launch.args))
            odd_strides = compile_check.Launch(launch.kernel, args, launch.kwargs, launch.origin)
            ttir = compile_check.compile_launch(odd_strides, 90).asm["ttir"]
            narrow = compile_check.narrow_products(ttir, strides)
            assert not narrow, (name, narrow)
        print("ok")
        """
    ))


def test_float_bits_decode_from_every_int_specialisation(compiled_mode):
    """A float's bits arrive as an int64, an int32 (small values) or the constant 1 (5e-324)."""
    _assert_prints_ok(compiled_mode(
        """
        import triton
        import triton.language as tl
        from triton.compiler import ASTSource

        from equinorm_kernels.triton import compile_check
        from equinorm_kernels.triton._runtime import float64_from_bits

        @triton.jit
        def decode(out_ptr, bits):
            tl.store(out_ptr, float64_from_bits(bits, tl.float32))

        target = compile_check.backend_for(90).target
        for kind, constants in (("i64", {}), ("i32", {}), ("constexpr", {"bits": 1})):
            signature = {"out_ptr": "*fp32", "bits": kind}
            triton.compile(ASTSource(decode, signature, constants), target=target)
        print("ok")
        """
    ))


def test_compile_check_compiles_the_kernels_of_a_c1_input_for_both_architectures(compiled_mode):
    result = compiled_mode(
        "from equinorm_kernels.triton.compile_check import main\n"
        "raise SystemExit(main(['--arch', '80', '90', '--quick', '--only', 'planar channel sums']))"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failure(s)" in result.stdout


# ---- float scalars as Inductor passes them ----

def _as_float32(value):
    return float(np.float32(value)) if isinstance(value, float) else value


@pytest.fixture
def floats_passed_as_float32(monkeypatch):
    """Every float argument of a kernel launch rounded to float32, as Inductor's launch code does."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    original = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        parameters = inspect.signature(self.fn).parameters
        constexprs = {name for name, p in parameters.items() if "constexpr" in str(p.annotation)}
        names = list(parameters)
        args = [value if names[i] in constexprs else _as_float32(value) for i, value in enumerate(args)]
        kwargs = {name: value if name in constexprs else _as_float32(value) for name, value in kwargs.items()}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)


needs_interpreter = pytest.mark.skipif(
    not triton_backend.interpreted() or "triton" not in equinorm_kernels.available_backends("cpu"),
    reason="runs the kernels under Triton's interpreter",
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or "triton" not in equinorm_kernels.available_backends("cuda"),
    reason="no GPU with Triton",
)


def _weight(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _forward(x, weight, groups, ratio, eps):
    return functional.equinorm_forward(
        x, weight, stats_fraction=1.0, ratio=ratio, groups=groups, mode="exact", eps=eps, backend="triton",
    )


def _reference(x, weight, groups, ratio, eps):
    mean = reference.equinorm.channel_mean_unchecked(x, 1.0)
    return reference.equinorm.equinorm_weight_unchecked(weight, mean, ratio, groups, "exact", None, eps), mean


def _zero_mean_case() -> tuple[torch.Tensor, torch.Tensor, int]:
    """float64 input whose channels of the first of two groups are all zero: M_d is the clamp
    ``tiny`` there, and P_d <= eps * |w| decides a zero weight."""
    x = torch.rand((3, 4, 5, 5), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[:, :2] = 0
    return x, _weight((6, 2, 3, 3)), 2


@needs_interpreter
def test_results_do_not_depend_on_how_floats_reach_the_kernels(floats_passed_as_float32):
    x, weight, groups = _zero_mean_case()
    ratio, eps = 0.7, 1e-7  # neither is a float32
    expected, expected_mean = _reference(x, weight, groups, ratio, eps)
    out, mean = _forward(x, weight, groups, ratio, eps)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-13, atol=0)
    assert torch.equal(out[:3], torch.zeros_like(out[:3]))

    producer, consumer = _weight((5, 7), seed=2), _weight((3, 5), seed=3)
    expected_d = reference.enorm.enorm_balance_pair_(producer.clone(), consumer.clone(), p=3.0, c=1.1)
    rows_then_columns = [0, 0, 1, 1, 1, 1, 1, 1, -1, 1, 1, 1]
    d = torch.ops.equinorm_kernels.triton_enorm_group_([producer, consumer], rows_then_columns, 3.0, 1.1)
    torch.testing.assert_close(d, expected_d, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=needs_gpu)]
)
def test_torch_compile_of_a_zero_mean_float64_input_matches_eager_and_the_reference(device, request):
    if device == "cpu":  # the interpreter's ops are opaque to torch.compile: give its scalars Inductor's types
        request.getfixturevalue("floats_passed_as_float32")
    x, weight, groups = _zero_mean_case()
    ratio, eps = 0.7, 1e-7
    expected, expected_mean = _reference(x, weight, groups, ratio, eps)

    def step(x, weight):
        return _forward(x, weight, groups, ratio, eps)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out, mean = compiled(x.to(device), weight.to(device))
    eager_out, eager_mean = step(x.to(device), weight.to(device))
    assert torch.equal(out, eager_out) and torch.equal(mean, eager_mean)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(mean.cpu(), expected_mean, rtol=1e-13, atol=0)
