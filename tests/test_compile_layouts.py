"""Inductor and layouts: the statistics ops read x in whatever layout Inductor gives the
convolution (on CPU it keeps conv outputs channels_last), and the weight ops read the weight and
its gradient in the layout Inductor gives the convolution's weight (channels_last too), so a
compiled EquiNorm layer copies neither, and its results are the eager ones."""
from __future__ import annotations

import copy
import re

import torch
import torch._dynamo
import torch._inductor.config
from torch import nn
from torch._inductor.utils import run_and_get_code

import equinorm_kernels as ek

OPS_READING_X = ("channel_mean", "equinorm_forward", "tap_mean")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        ek.EquiNormConv2d(3, 8, 3, padding=1, backend="cpp"),
        nn.ReLU(),
        ek.EquiNormConv2d(8, 8, 3, padding=1, backend="cpp"),
        nn.ReLU(),
        ek.EquiNormConv2d(8, 8, 3, stride=2, padding=1, per_tap=True, backend="cpp"),
    ).train()


OPS_READING_WEIGHTS = ("equinorm_weight", "equinorm_backward")


def test_every_op_reading_x_or_a_weight_is_tagged_for_any_layout():
    for name in OPS_READING_X + OPS_READING_WEIGHTS:
        assert torch.Tag.flexible_layout in getattr(torch.ops.equinorm_kernels, name).default.tags, name


def _buffer_read_by(line: str) -> str:
    return re.search(r"\((\w+),", line).group(1)


# Compiled afresh: a cached graph from before a schema change would carry its old layouts.
@torch._inductor.config.patch(fx_graph_cache=False)
def test_compiled_layers_read_the_buffer_their_convolution_reads_and_match_eager():
    torch._dynamo.reset()
    model = _model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.rand(4, 3, 10, 10)

    def step(module):
        module.zero_grad(set_to_none=True)
        out = module(x)
        out.square().sum().backward()
        return out

    out, (forward_code, backward_code) = run_and_get_code(step, compiled)
    expected = step(eager)

    # Each statistics op is followed by its layer's convolution; both must read one buffer.
    calls = [line.strip() for line in forward_code.splitlines()
             if re.search(r"equinorm_kernels\.(%s)\.default\(|extern_kernels\.convolution\(" % "|".join(OPS_READING_X),
                          line)]  # fmt: skip
    statistics = [i for i, line in enumerate(calls) if "equinorm_kernels." in line]
    assert len(statistics) == 3, calls
    for i in statistics:
        convolution = next(line for line in calls[i + 1 :] if "extern_kernels.convolution(" in line)
        assert _buffer_read_by(calls[i].split("=", 1)[1]) == _buffer_read_by(convolution), (calls[i], convolution)

    _assert_weight_backward_reads_the_convolutions_weight_gradient(backward_code)

    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Float32 sums in another order: errors scale with the largest gradient (a bias gradient is the
    # sum of a layer's outputs, which EquiNorm makes zero, so relative errors mean nothing there).
    scale = max(p.grad.abs().max().item() for p in eager.parameters())
    for (name, got), want in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    for (name, got), want in zip(model.named_buffers(), eager.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _assert_weight_backward_reads_the_convolutions_weight_gradient(backward_code: str) -> None:
    """Each equinorm_backward call takes dL/dw'' as convolution_backward returned it (no copy into
    another layout in between), and the weight as the graph received it."""
    lines = [line.strip() for line in backward_code.splitlines()]
    convolution_results = {m.group(1) for line in lines
                           if (m := re.match(r"(\w+) = torch\.ops\.aten\.convolution_backward\.", line))}  # fmt: skip
    weight_gradients = {m.group(1) for line in lines
                        if (m := re.match(r"(\w+) = (\w+)\[1\]$", line)) and m.group(2) in convolution_results}  # fmt: skip
    calls = [re.search(r"equinorm_backward\.default\((\w+), (\w+),", line) for line in lines]
    calls = [call.groups() for call in calls if call]
    assert len(calls) == 3, calls
    for grad_out, weight in calls:
        assert grad_out in weight_gradients, (grad_out, weight_gradients)
        assert weight.startswith("primals_"), weight
