"""torch.func transforms through EquiNorm layers and ops: grad, per-sample gradients (vmap of grad),
jacrev, and model ensembles (vmap over stacked parameters), each against the same transform of the
pure-PyTorch reference functions."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, jvp, stack_module_state, vjp, vmap

import equinorm_kernels as ek
from equinorm_kernels import reference
from equinorm_kernels.backends import cpu_train_forward, resolve_backend

from kernel_backends import fused_backend_params

BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu"), *fused_backend_params()]
pytestmark = [
    pytest.mark.parametrize("backend,device", BACKENDS),
    # vmap runs the fused ops once per batch entry (no batching rule) and says so.
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]
RTOL, ATOL = 1e-9, 1e-11


def _conv_layer(backend: str, device: str, per_tap: bool = False, statistic: str = "abs_mean") -> ek.EquiNormConv2d:
    torch.manual_seed(0)
    layer = ek.EquiNormConv2d(3, 4, 3, padding=1, per_tap=per_tap, statistic=statistic, backend=backend)
    with torch.no_grad():
        layer.gain.uniform_(0.5, 1.5)
        layer.bias.normal_()
    return layer.to(device=device, dtype=torch.float64)


def _reference_conv(params: dict, x: torch.Tensor, statistic: str, per_tap: bool, mean=None) -> torch.Tensor:
    """The layer's training forward (or, given ``mean``, its eval forward) from reference functions."""
    if mean is None:
        mean = (reference.tap_mean(x, 3, padding=1, statistic=statistic) if per_tap
                else reference.channel_mean(x, statistic=statistic))  # fmt: skip
    weight = reference.equinorm_weight(params["weight"], mean, gain=params["gain"])
    return F.conv2d(x, weight, params["bias"], padding=1)


def _inputs(device: str, signed: bool, batch: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.rand(batch, 3, 5, 5, dtype=torch.float64, device=device)
    return x - 0.4 if signed else x


def _assert_all_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("per_tap", [False, True], ids=["channel", "per_tap"])
@pytest.mark.parametrize("signed", [False, True], ids=["non_negative", "signed"])
def test_grad_of_a_training_layer_matches_the_reference(backend, device, per_tap, signed):
    layer = _conv_layer(backend, device, per_tap)
    x = _inputs(device, signed)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}

    # The buffers are the transformed function's input, so that the forward may update them (as
    # BatchNorm's must be).
    def loss(params, x, buffers):
        return functional_call(layer, (params, buffers), (x,)).square().sum()

    def reference_loss(params, x):
        return _reference_conv(params, x, "abs_mean", per_tap).square().sum()

    got_params, got_x = grad(loss, argnums=(0, 1))(params, x, buffers)
    expected_params, expected_x = grad(reference_loss, argnums=(0, 1))(params, x)
    _assert_all_close({**got_params, "x": got_x}, {**expected_params, "x": expected_x})
    # The training forward tracked the batch's statistic in the buffers it was given.
    assert buffers["num_batches_tracked"].item() == 1
    assert not torch.equal(buffers["running_mean"], torch.ones_like(buffers["running_mean"]))


def test_grad_of_a_linear_layer_matches_the_reference(backend, device):
    torch.manual_seed(0)
    layer = ek.EquiNormLinear(5, 4, backend=backend).to(device=device, dtype=torch.float64)
    x = _inputs(device, signed=True).reshape(45, 5)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}

    def loss(params, buffers):
        return functional_call(layer, (params, buffers), (x,)).square().sum()

    def reference_loss(params):
        mean = reference.channel_mean(x, statistic=layer.statistic)
        weight = reference.equinorm_weight(params["weight"], mean, gain=params["gain"])
        return F.linear(x, weight, params["bias"]).square().sum()

    _assert_all_close(grad(loss)(params, buffers), grad(reference_loss)(params))


@pytest.mark.parametrize("per_tap", [False, True], ids=["channel", "per_tap"])
def test_per_sample_gradients_in_eval(backend, device, per_tap):
    # vmap of grad over the samples, as differential privacy computes them: eval mode, so every
    # sample sees the running statistics and the batch does not mix.
    layer = _conv_layer(backend, device, per_tap)
    x = _inputs(device, signed=False, batch=4)
    layer(x)  # one training step's statistics
    layer.eval()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    buffers = {name: b.clone() for name, b in layer.named_buffers()}

    def sample_loss(params, sample):
        return functional_call(layer, (params, buffers), (sample.unsqueeze(0),)).square().sum()

    def reference_sample_loss(params, sample):
        out = _reference_conv(params, sample.unsqueeze(0), "abs_mean", per_tap, mean=buffers["running_mean"])
        return out.square().sum()

    got = vmap(grad(sample_loss), in_dims=(None, 0))(params, x)
    expected = vmap(grad(reference_sample_loss), in_dims=(None, 0))(params, x)
    _assert_all_close(got, expected)
    assert not torch.allclose(got["weight"][0], got["weight"][1])  # the samples' own gradients


def test_ensemble_of_training_layers(backend, device):
    # vmap over stacked parameters and buffers (torch.func.stack_module_state), one shared batch.
    layers = []
    for seed in range(3):
        torch.manual_seed(seed)
        layers.append(ek.EquiNormConv2d(3, 4, 3, padding=1, backend=backend).to(device=device, dtype=torch.float64))
    x = _inputs(device, signed=True)
    params, buffers = stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for index, layer in enumerate(layers):
        own = {name: p.detach() for name, p in layer.named_parameters()}
        torch.testing.assert_close(out[index], _reference_conv(own, x, "abs_mean", False), rtol=RTOL, atol=ATOL)
    assert buffers["num_batches_tracked"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("statistic", ["mean", "abs_mean"])
def test_jacrev_of_the_statistics(backend, device, statistic):
    x = _inputs(device, signed=statistic == "abs_mean", batch=2)
    got = jacrev(lambda v: ek.channel_mean(v, statistic=statistic, stats_fraction=0.5, backend=backend))(x)
    expected = jacrev(lambda v: reference.channel_mean(v, statistic=statistic, stats_fraction=0.5))(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    got = jacrev(lambda v: ek.tap_mean(v, 3, stride=2, padding=1, statistic=statistic, backend=backend))(x)
    expected = jacrev(lambda v: reference.tap_mean(v, 3, stride=2, padding=1, statistic=statistic))(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# Forward-mode AD (jvp, jacfwd, hessian, torch.autograd.forward_ad): the fused ops carry no
# tangents, so every backend answers through the reference there; the tangents must be exact.


@pytest.mark.parametrize("statistic", ["mean", "abs_mean"])
def test_jvp_of_the_ops_matches_the_reference(backend, device, statistic):
    x = _inputs(device, signed=statistic == "abs_mean", batch=2)
    torch.manual_seed(2)
    x_tangent = torch.randn_like(x)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device)
    weight_tangent = torch.randn_like(weight)
    cases = {
        "channel_mean": (lambda v: ek.channel_mean(v, statistic=statistic, stats_fraction=0.5, backend=backend),
                         lambda v: reference.channel_mean(v, statistic=statistic, stats_fraction=0.5)),
        "tap_mean": (lambda v: ek.tap_mean(v, 3, stride=2, padding=1, statistic=statistic, backend=backend),
                     lambda v: reference.tap_mean(v, 3, stride=2, padding=1, statistic=statistic)),
    }
    for name, (fused, specification) in cases.items():
        got = jvp(fused, (x,), (x_tangent,))
        expected = jvp(specification, (x,), (x_tangent,))
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=name)
        assert expected[1].abs().max() > 0, name  # a tangent that can tell zero from the truth

    mean = reference.channel_mean(x, statistic="abs_mean")

    def fused_weight(w, mu):
        return ek.equinorm_weight(w, mu, backend=backend)

    got = jvp(fused_weight, (weight, mean), (weight_tangent, x_tangent[0, :, 0, 0]))
    expected = jvp(reference.equinorm_weight, (weight, mean), (weight_tangent, x_tangent[0, :, 0, 0]))
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg="equinorm_weight")


# How a training layer's forward builds w'': the channel means then the weight, the same in one
# fused call (equinorm_forward, what a layer with channel statistics runs), or per-tap means.
STATISTICS_PATHS = ["channel", "fused_forward", "per_tap"]


def _normalized_convs(backend: str, device: str, path: str):
    """A training layer's forward as ops, (weight, x) -> output: through the backend's ops, and
    through the reference functions. Ops rather than a layer: a layer's training forward updates
    its running statistics in place, which a transform can only take when they are its input."""
    torch.manual_seed(0)
    gain = torch.rand(4, dtype=torch.float64, device=device) + 0.5

    def fused(w, v):
        if path == "fused_forward":
            weight = ek.equinorm_forward(v, w, gain=gain, statistic="abs_mean", backend=backend)[0]
            return F.conv2d(v, weight, padding=1)
        mean = (ek.tap_mean(v, 3, padding=1, statistic="abs_mean", backend=backend) if path == "per_tap"
                else ek.channel_mean(v, statistic="abs_mean", backend=backend))  # fmt: skip
        return F.conv2d(v, ek.equinorm_weight(w, mean, gain=gain, backend=backend), padding=1)

    def specification(w, v):
        return _reference_conv({"weight": w, "gain": gain, "bias": None}, v, "abs_mean", path == "per_tap")

    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device)
    return fused, specification, weight, _inputs(device, signed=True, batch=2)


@pytest.mark.parametrize("path", STATISTICS_PATHS)
def test_vjp_of_a_normalized_convolution_matches_the_reference(backend, device, path):
    fused, specification, weight, x = _normalized_convs(backend, device, path)
    out, pullback = vjp(fused, weight, x)
    expected_out, expected_pullback = vjp(specification, weight, x)
    torch.testing.assert_close(out, expected_out, rtol=RTOL, atol=ATOL)
    cotangent = torch.randn_like(out)
    got, expected = pullback(cotangent), expected_pullback(cotangent)
    for name, a, b in zip(("weight", "x"), got, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("path", STATISTICS_PATHS)
def test_hessian_of_a_normalized_convolution_matches_the_reference(backend, device, path):
    # hessian is jacfwd of jacrev: forward-mode AD around the backward.
    fused, specification, weight, x = _normalized_convs(backend, device, path)
    got = hessian(lambda v: fused(weight, v).square().sum())(x)
    expected = hessian(lambda v: specification(weight, v).square().sum())(x)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("per_tap", [False, True], ids=["channel", "per_tap"])
def test_forward_ad_dual_tensors_through_a_training_layer(backend, device, per_tap):
    # torch.autograd.forward_ad without torch.func: no transform is on the stack, and a layer's
    # one-call forward must step aside as well.
    layer = _conv_layer(backend, device, per_tap)
    x = _inputs(device, signed=True)
    torch.manual_seed(3)
    tangent = torch.randn_like(x)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    with fwAD.dual_level():
        out = layer(fwAD.make_dual(x, tangent))
        got, got_tangent = fwAD.unpack_dual(out)
    expected, expected_tangent = jvp(
        lambda v: _reference_conv(params, v, "abs_mean", per_tap), (x,), (tangent,)
    )
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got_tangent, expected_tangent, rtol=RTOL, atol=ATOL)


def test_forward_ad_through_the_eval_weight(backend, device):
    # The eval weight is built once and reused. A dual weight shares its primal's data and version:
    # reusing the primal's weight for it would lose the tangent.
    layer = _conv_layer(backend, device)
    x = _inputs(device, signed=False)
    layer(x)
    layer.eval()
    layer(x)  # the eval weight, built and kept
    params = {name: p.detach() for name, p in layer.named_parameters()}
    torch.manual_seed(4)
    tangent = torch.randn_like(params["weight"])
    with fwAD.dual_level():
        out = functional_call(layer, {"weight": fwAD.make_dual(params["weight"], tangent)}, (x,), strict=False)
        got_tangent = fwAD.unpack_dual(out).tangent
    mean = layer.running_mean.clone()
    _, expected_tangent = jvp(
        lambda w: _reference_conv({**params, "weight": w}, x, "abs_mean", False, mean=mean),
        (params["weight"],), (tangent,),
    )
    torch.testing.assert_close(got_tangent, expected_tangent, rtol=RTOL, atol=ATOL)


def test_forward_ad_leaves_the_backend_choice_as_it_was(backend, device):
    # The backend is swapped only while a dual level is open, and nothing of it is remembered.
    target = torch.device(device)
    with fwAD.dual_level():
        assert resolve_backend(backend, target).name == "reference"
        assert cpu_train_forward(backend, "conv_train_forward") is None
    assert resolve_backend(backend, target).name == backend
    whole_layer = resolve_backend(backend, torch.device("cpu")).conv_train_forward
    assert cpu_train_forward(backend, "conv_train_forward") is whole_layer
