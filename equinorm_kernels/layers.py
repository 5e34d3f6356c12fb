"""Drop-in layers: nn.Conv1d/2d/3d and nn.Linear whose weight is EquiNorm-rescaled on every forward.

    y = conv(x, gain_d * w''(w, mu)) + bias_d

with mu the batch's per-input-channel means in training (tracked in ``running_mean``) and the
running mean in eval. ``gain`` and ``bias`` are the per-output-channel affine that follows the
normalization, as BatchNorm's weight and bias are; the gain is folded into the weight, so the layer
runs a single convolution.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, _value_checks
from .backends import cpu_train_forward
from .functional import channel_mean, checked_equinorm_forward, equinorm_weight, tap_mean


@torch.no_grad()
def balance_signs_(weight: torch.Tensor) -> torch.Tensor:
    """Resample the signs of every output channel's weights that are all positive or all negative.

    The paper's balanced initialisation (section 5.2): EquiNorm balances positive against negative
    weights, so no output channel should start one-signed. Magnitudes are kept. In place; returns
    ``weight``. Rows with fewer than two non-zero weights cannot be balanced and are left as they are.
    A weight on the meta device has no values and is returned unchanged: materialise it (``to_empty``)
    and call the layer's ``reset_parameters()``.
    """
    if weight.is_meta:
        return weight
    rows = weight.flatten(1) if weight.is_contiguous() else weight.reshape(weight.shape[0], -1)
    fixable = (rows != 0).sum(dim=1) >= 2
    while True:
        one_signed = fixable & ~((rows > 0).any(dim=1) & (rows < 0).any(dim=1))
        if not bool(one_signed.any()):
            break
        chosen = rows[one_signed]
        signs = torch.randint(0, 2, chosen.shape, device=rows.device).to(rows.dtype) * 2 - 1
        rows[one_signed] = chosen.abs() * signs
    if not weight.is_contiguous():
        weight.copy_(rows.view_as(weight))
    return weight


def _check_layer_options(
    mode: object, momentum: object, stats_fraction: object, eps: object, backend: object, statistic: object = "abs_mean"
) -> None:
    _checks.check_statistic(statistic)
    if mode not in _checks.MODES:
        raise ValueError(f"mode must be one of {_checks.MODES}, got {mode!r}")
    if momentum is not None:
        _checks.check_number(momentum, "momentum", low=0.0, high=1.0, low_inclusive=True)
    _checks.check_number(stats_fraction, "stats_fraction", low=0.0, high=1.0)
    _checks.check_number(eps, "eps", low=0.0)
    _checks.check_backend_name(backend)


class ChannelAffine(nn.Module):
    """A per-channel scale and shift, ``y = x * weight_c + bias_c``, over dim 1 of (N, C, *) inputs.

    What :func:`equinorm_kernels.convert` leaves of a BatchNorm that normalised an activation's
    output (conv -> activation -> BatchNorm): the conv before the activation is normalised by
    EquiNorm, and the BatchNorm's learned affine stays where it was.

    Args:
        num_features: C.
        device, dtype: of ``weight`` and ``bias`` (ones and zeros), both differentiable.
    """

    def __init__(self, num_features: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.weight.shape[0]:
            raise ValueError(
                f"ChannelAffine expects an input of shape (N, {self.weight.shape[0]}, *), got {tuple(x.shape)}"
            )
        broadcast = (-1,) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.bias.view(broadcast), x, self.weight.view(broadcast))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class EquiNormLayer(nn.Module):
    """What the EquiNorm conv and linear layers share: options, gain, running mean, forward."""

    _spatial_dims: int  # 0 for Linear
    statistic: str = "abs_mean"  # layers pickled before the option existed
    _plain_class: type[nn.Module]
    # Set by equinorm_kernels.convert_sync_equinorm: training statistics over a process group.
    statistics_sync = None
    # Conv layers with per_tap=True take exact per-tap statistics (tap_mean) instead of channel means.
    per_tap = False

    def _init_equinorm(
        self, mode: str, momentum: float | None, stats_fraction: float, eps: float, backend: str,
        statistic: str = "abs_mean",
    ) -> None:
        _check_layer_options(mode, momentum, stats_fraction, eps, backend, statistic)
        self.statistic = statistic
        if math.prod(self.weight.shape[1:]) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 weights per output channel "
                f"(in_channels/groups * kernel taps >= 2), got weight of shape {tuple(self.weight.shape)}"
            )
        self.mode, self.momentum, self.stats_fraction = mode, momentum, float(stats_fraction)
        self.eps, self.backend = float(eps), backend
        device = self.weight.device
        self.gain = nn.Parameter(torch.ones(self.weight.shape[0], device=device, dtype=self.weight.dtype))
        stats_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        in_channels = self.weight.shape[1] * getattr(self, "groups", 1)
        # Ones, not zeros: before any training every input channel counts equally.
        self.register_buffer("running_mean", torch.ones(in_channels, device=device, dtype=stats_dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        balance_signs_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "gain"):
            nn.init.ones_(self.gain)
        if hasattr(self, "running_mean"):  # as BatchNorm: a reset layer has no statistics yet
            self.reset_running_stats()

    def reset_running_stats(self) -> None:
        self.running_mean.fill_(1.0)
        self.num_batches_tracked.zero_()

    # --- shapes -------------------------------------------------------------------------------
    def _in_channels(self) -> int:
        return self.weight.shape[1] * getattr(self, "groups", 1)

    def _check_input(self, x: torch.Tensor) -> bool:
        """Validate ``x``; True when it is batched."""
        batched_dim = self._spatial_dims + 2
        if not isinstance(x, torch.Tensor):
            if _checks.is_fx_tracing():
                raise TypeError(
                    f"{type(self).__name__} cannot be traced through by torch.fx symbolic tracing (its ratio needs "
                    "the input's concrete shape): trace it as a leaf module (Tracer.is_leaf_module) or use torch.export"
                )
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor input, got {type(x).__name__}")
        channels = self._in_channels()
        if self._spatial_dims == 0:
            if x.dim() < 1 or x.shape[-1] != channels:
                raise ValueError(f"{type(self).__name__} expects input of shape (..., {channels}), got {tuple(x.shape)}")
            return x.dim() > 1
        if x.dim() not in (batched_dim, batched_dim - 1) or x.shape[-self._spatial_dims - 1] != channels:
            spatial = ", ".join(("D", "H", "W")[-self._spatial_dims :])
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, {channels}, {spatial}) or ({channels}, {spatial}), "
                f"got {tuple(x.shape)}"
            )
        return x.dim() == batched_dim

    def _check_fused_input(self, x: torch.Tensor, fraction: float) -> None:
        """What the fused forward needs of ``x`` (N, C, *spatial) beyond its shape: it skips its
        argument checks, as the layer's options were checked when it was built."""
        if x.dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
        _checks.check_same_device(self.weight, x, "weight", "x")
        if x.numel() == 0:
            _checks.check_channel_mean_args(x, fraction)  # raises, naming the empty dimension

    def _ratio(self, spatial_in: Sequence[int]) -> float:
        return 1.0

    # --- statistics ---------------------------------------------------------------------------
    def _statistics_input(self, x: torch.Tensor, batched: bool) -> tuple[torch.Tensor, float]:
        """x as (N, C, *spatial) and the fraction of its dim 0 that feeds the channel means."""
        if not batched:
            return x.unsqueeze(0), 1.0
        if self._spatial_dims == 0 and x.dim() > 2:
            # Linear on (N, ..., C): samples are along dim 0, every other leading dim is batch too.
            rows = _checks.stats_rows(x.shape[0], self.stats_fraction)
            return x[:rows].reshape(-1, x.shape[-1]), 1.0
        return x, self.stats_fraction

    def _local_statistic(self, x: torch.Tensor, fraction: float) -> torch.Tensor:
        """This process's statistic of ``x`` (N, C, *spatial), differentiable: the channel means
        (C,); what a synchronised layer reduces over its group (see :mod:`equinorm_kernels.distributed`)."""
        return channel_mean(x, stats_fraction=fraction, statistic=self.statistic, backend=self.backend)

    def _statistic_count(self, x: torch.Tensor, rows: int) -> int:
        """The number of values behind each entry of the statistic of ``x[:rows]``."""
        return rows * math.prod(x.shape[2:])

    def _statistic_shape(self) -> tuple[int, ...]:
        """The shape of the statistic (and of ``running_mean``)."""
        return tuple(self.running_mean.shape)

    # The Backend field that makes this layer's training forward in one call (None: no such op).
    _one_call_field: str | None = None

    def _train_forward_in_one_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The statistics, w'', the running mean's update and the layer's op in one call of the
        backend's ``conv_train_forward`` or ``linear_train_forward``, for eager CPU calls (at small
        shapes the steps' Python is most of a layer call's host time): batched ``x`` of the weight's
        dtype (a conv input, or a Linear's (N, C)), gain and running mean in the accumulation dtype,
        batch statistics of this process alone. None elsewhere, for input the steps' checks reject,
        and where the value screen fails (nothing is tracked then), so that the steps' own checks
        name the culprit: the forward then makes its steps itself."""
        # Parameters and buffers read from the module's dicts: Module.__getattr__ costs
        # microseconds a lookup next to the kernels. A parametrization or hook keeps one elsewhere.
        parameters, buffers = self._parameters, self._buffers
        try:
            weight, gain, bias = parameters["weight"], parameters["gain"], parameters["bias"]
            running_mean, count = buffers["running_mean"], buffers["num_batches_tracked"]
        except KeyError:
            return None
        # groups: nn.Conv keeps it in the instance dict (read there, as the weights above); a
        # Linear layer has none, one group.
        if (
            self._one_call_field is None or self.statistics_sync is not None or not isinstance(x, torch.Tensor)
            or not (x.is_cpu and weight.is_cpu) or x.dim() != self._spatial_dims + 2
            or x.shape[1] != weight.shape[1] * self.__dict__.get("groups", 1) or x.dtype != weight.dtype
            or weight.shape[0] == 0 or x.numel() == 0 or torch.compiler.is_compiling()
            or _checks.func_transform_active() or not self._layer_takes_one_call()
        ):  # fmt: skip
            return None
        run = cpu_train_forward(self.backend, self._one_call_field)
        accumulation = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # Eager calls: the checks are not traced. Where they are deferred, the steps defer them.
        screen = _checks.value_check_mode() != "off"
        if (run is None or not gain.dtype == running_mean.dtype == accumulation
                or (screen and _value_checks.deferred_for_type("cpu"))):  # fmt: skip
            return None
        out, passed = run(
            x, _checks.stats_rows(x.shape[0], self.stats_fraction), weight, gain, bias, running_mean, count,
            self.momentum, *self._one_call_options(x), self.mode, self.eps, self.statistic, screen,
        )
        return out if passed else None

    def _layer_takes_one_call(self) -> bool:
        """What the layer's own options ask of the one-call forward."""
        return True

    def _one_call_options(self, x: torch.Tensor) -> tuple:
        """The one-call op's arguments for the layer's own op, between momentum and mode."""
        return ()

    def _track(self, mean: torch.Tensor) -> None:
        # csrc/layer_forward.cpp makes the same update (layers in one call): change both.
        # No no_grad context (entering and leaving one costs more than the update): the buffers
        # need no gradient, and a mean that has one is detached first.
        running_mean = self.running_mean
        if mean.requires_grad or mean.dtype != running_mean.dtype:
            mean = mean.detach().to(running_mean.dtype)
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as BatchNorm's momentum=None
            # A tensor factor: reading the count on the host would synchronise with the GPU.
            factor = self.num_batches_tracked.to(running_mean.dtype).reciprocal()
        else:
            factor = self.momentum
        running_mean.lerp_(mean, factor)

    # --- forward and folding ------------------------------------------------------------------
    def _options(self, ratio: float) -> dict:
        groups = getattr(self, "groups", 1)
        return dict(ratio=ratio, groups=groups, mode=self.mode, gain=self.gain, eps=self.eps, backend=self.backend)

    def normalized_weight(self, mean: torch.Tensor, ratio: float) -> torch.Tensor:
        """The weight the layer applies: gain_d * w''(weight, mean), same shape as ``weight``."""
        if self.weight.shape[0] == 0:  # no output channel, nothing to normalise
            return self.weight
        return equinorm_weight(self.weight, mean, **self._options(ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            out = self._train_forward_in_one_call(x)
            if out is not None:
                return out
        batched = self._check_input(x)
        ratio = self._ratio(x.shape[x.dim() - self._spatial_dims :])
        if not self.training or self.weight.shape[0] == 0:
            return self._run_op(x, self._eval_weight(ratio))
        statistics_input, fraction = self._statistics_input(x, batched)
        if self.statistics_sync is not None:
            weight, mean = self.statistics_sync(self, statistics_input, fraction, ratio)
        elif self.per_tap:  # the statistic, then the weight: the fused forward takes channel means
            mean = self._local_statistic(statistics_input, fraction)
            weight = self.normalized_weight(mean, ratio)
        else:
            # One fused call: the batch's channel means and the weight built from them (validated
            # before the means are tracked).
            self._check_fused_input(statistics_input, fraction)
            weight, mean = checked_equinorm_forward(
                statistics_input, self.weight, fraction, ratio, getattr(self, "groups", 1), self.mode, self.gain,
                self.eps, self.statistic, self.backend,
            )
        self._track(mean)
        return self._run_op(x, weight)

    def _eval_weight(self, ratio: float) -> torch.Tensor:
        """The eval-mode weight, built once and reused while nothing it depends on changes.

        It depends on ``weight``, ``gain`` and ``running_mean`` (the tensors, their data and their
        in-place versions: an optimizer step, ``load_state_dict``, ``nn.init``, an assignment or a
        move to another device or dtype all make a new one), the ratio and the options. In-place
        changes through ``.data`` escape version counting: call :meth:`reset_eval_weight` after them. Not reused where autograd
        must see it (grad enabled and a parameter requiring grad), nor under ``torch.compile``,
        which builds the weight inside its graph, nor under torch.func transforms.
        """
        needs_graph = torch.is_grad_enabled() and (self.weight.requires_grad or self.gain.requires_grad)
        # Under torch.func the tensors are wrappers without the data pointers the cache key reads.
        if needs_graph or torch.compiler.is_compiling() or _checks.func_transform_active():
            return self.normalized_weight(self.running_mean, ratio)
        key = self._eval_weight_key(ratio)
        cached = self.__dict__.get("_cached_eval_weight")
        if cached is not None and _same_key(cached[0], key):
            return cached[1]
        weight = self.normalized_weight(self.running_mean, ratio)
        # A plain attribute, not a buffer: never in the state_dict.
        self.__dict__["_cached_eval_weight"] = (key, weight)
        return weight

    def __getstate__(self) -> dict:
        # Copies and pickles of the layer rebuild the eval weight rather than carry it.
        state = dict(super().__getstate__())
        state.pop("_cached_eval_weight", None)
        return state

    def reset_eval_weight(self) -> None:
        """Forget the eval-mode weight built so far (it is rebuilt at the next eval forward)."""
        self.__dict__.pop("_cached_eval_weight", None)

    def _eval_weight_key(self, ratio: float) -> tuple:
        # The data pointer too: Module.to() and .half() swap a parameter's data in place of the object.
        sources = tuple((t, (t._version, t.data_ptr(), t.dtype)) for t in (self.weight, self.gain, self.running_mean))
        options = (ratio, getattr(self, "groups", 1), self.mode, self.eps, self.backend)
        return sources + (options, torch.is_inference_mode_enabled())

    def _run_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _plain_kwargs(self) -> dict:
        raise NotImplementedError

    def _fold_ratio(self, input_size: Sequence[int] | None) -> float:
        return 1.0

    @torch.no_grad()
    def fold(self, input_size: Sequence[int] | None = None) -> nn.Module:
        """A plain nn.Conv*d / nn.Linear with the eval-mode weight (running mean, gain) and bias baked
        in: same output as this layer in eval mode.

        Args:
            input_size: spatial size of the inputs the folded conv will see; needed only when the
                ratio depends on it (a stride above 1 or padding other than "same").
        """
        ratio = self._fold_ratio(input_size)
        plain = self._plain_class(**self._plain_kwargs(), bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        plain.weight.copy_(self.normalized_weight(self.running_mean, ratio))
        if self.bias is not None:
            plain.bias.copy_(self.bias)
        return plain.train(self.training)

    def extra_repr(self) -> str:
        options = f"mode={self.mode!r}, statistic={self.statistic!r}, momentum={self.momentum}, "
        options += f"stats_fraction={self.stats_fraction}, eps={self.eps}"
        if self.per_tap:
            options += ", per_tap=True"
        return f"{super().extra_repr()}, {options}, backend={self.backend!r}"


def _same_key(cached: tuple, key: tuple) -> bool:
    """Tensors compared by identity and version (the cache holds them, so no id is reused), the rest by value."""
    *cached_sources, cached_rest, cached_inference = cached
    *sources, rest, inference = key
    same_tensors = all(a is b and va == vb for (a, va), (b, vb) in zip(cached_sources, sources))
    return same_tensors and cached_rest == rest and cached_inference == inference


def _output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


class _EquiNormConvNd(EquiNormLayer):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str | int | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        mode: str = "single_pass",
        momentum: float | None = 0.1,
        stats_fraction: float = 1.0,
        eps: float = 1e-5,
        backend: str = "auto",
        statistic: str = "abs_mean",
        per_tap: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._init_equinorm(mode, momentum, stats_fraction, eps, backend, statistic)
        if not isinstance(per_tap, bool):
            raise TypeError(f"per_tap must be a bool, got {type(per_tap).__name__}")
        self.per_tap = per_tap
        if per_tap:  # one running statistic per input channel and kernel tap
            running = torch.ones((self._in_channels(), *self.kernel_size), dtype=self.running_mean.dtype,
                                 device=self.running_mean.device)
            self.register_buffer("running_mean", running)

    def _local_statistic(self, x: torch.Tensor, fraction: float) -> torch.Tensor:
        """Channel means (C,), or with ``per_tap`` the per-tap means (C, *kernel) of this convolution."""
        if not self.per_tap:
            return super()._local_statistic(x, fraction)
        return tap_mean(x, self.kernel_size, self.stride, self.padding, self.dilation, self.padding_mode,
                        stats_fraction=fraction, statistic=self.statistic, backend=self.backend)

    def _statistic_count(self, x: torch.Tensor, rows: int) -> int:
        if not self.per_tap:
            return super()._statistic_count(x, rows)
        return rows * math.prod(self._output_spatial(x.shape[2:]))

    def _output_spatial(self, spatial_in: Sequence[int]) -> list[int]:
        """The convolution's output spatial size for an input of ``spatial_in``."""
        if self.padding == "same":
            return list(spatial_in)
        padding = (0,) * self._spatial_dims if self.padding == "valid" else self.padding
        return [
            _output_size(n, k, s, p, d)
            for n, k, s, p, d in zip(spatial_in, self.kernel_size, self.stride, padding, self.dilation)
        ]

    def _ratio_is_constant(self) -> bool:
        """rho = 1 for every input size: stride 1 and an output as large as the input.

        Remembered with the geometry it was worked out for (asked at every call); not under
        torch.compile, which evaluates it once while tracing.
        """
        if torch.compiler.is_compiling():
            return self._geometry_keeps_ratio_one()
        geometry = (self.padding, self.stride, self.dilation, self.kernel_size)
        remembered = self.__dict__.get("_constant_ratio")
        if remembered is not None and remembered[0] == geometry:
            return remembered[1]
        constant = self._geometry_keeps_ratio_one()
        self.__dict__["_constant_ratio"] = (geometry, constant)
        return constant

    def _geometry_keeps_ratio_one(self) -> bool:
        if self.padding == "same":
            return True
        if self.padding == "valid":
            return False
        return all(
            s == 1 and 2 * p == d * (k - 1)
            for s, p, d, k in zip(self.stride, self.padding, self.dilation, self.kernel_size)
        )

    def _ratio(self, spatial_in: Sequence[int]) -> float:
        if self._ratio_is_constant() or self.per_tap:  # per-tap means are exact: no ratio
            return 1.0
        spatial_out = self._output_spatial(spatial_in)
        if min(spatial_out) < 1:
            raise ValueError(
                f"{type(self).__name__}: input spatial size {tuple(spatial_in)} is too small for kernel "
                f"{self.kernel_size} with padding {self.padding} and dilation {self.dilation}"
            )
        return math.prod(spatial_out) * math.prod(self.stride) / math.prod(spatial_in)

    def _fold_ratio(self, input_size: Sequence[int] | None) -> float:
        if self._ratio_is_constant() or self.per_tap:
            return 1.0
        if input_size is None:
            raise ValueError(
                f"{type(self).__name__}.fold() needs input_size (the spatial size of its inputs): with stride "
                f"{self.stride} and padding {self.padding} the ratio rho depends on it"
            )
        input_size = tuple(input_size)
        if len(input_size) != self._spatial_dims or not all(isinstance(n, int) and n > 0 for n in input_size):
            raise ValueError(f"input_size must be {self._spatial_dims} positive ints, got {input_size}")
        return self._ratio(input_size)

    def _run_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)

    _one_call_field = "conv_train_forward"

    def _layer_takes_one_call(self) -> bool:
        # Zero padding given as sizes: the op convolves with F.conv*d's padding argument.
        return not self.per_tap and self.padding_mode == "zeros" and not isinstance(self.padding, str)

    def _one_call_options(self, x: torch.Tensor) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups, self._ratio(x.shape[2:])

    def _plain_kwargs(self) -> dict:
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )


_LAYER_OPTIONS_DOC = """
    Arguments as ``{base}``, plus (keyword-only):
        mode: "single_pass" (default, the paper's experiments) or "exact".
        momentum: running-mean update factor, ``(1 - momentum) * running_mean + momentum * mu``;
            None for a cumulative average.
        stats_fraction: only the first ceil(stats_fraction * N) samples feed the statistics in
            training (0.25 is the paper's regulariser, section 6.1).
        eps: relative threshold of the positive mass below which an output channel's weight is zero
            (a constant kernel, or only zero inputs); see :mod:`equinorm_kernels.reference`.
        backend: "auto" or a name from :func:`equinorm_kernels.available_backends`.
        statistic: the per-input-channel statistic. "abs_mean" (default): the mean of |x|, the
            input's L1 mass, valid for inputs of any sign; on non-negative inputs it is the mean,
            bit for bit, with the same gradients, so results are the paper's. "mean": the paper's
            statistic, for non-negative inputs only (a negative channel mean is an error).
        per_tap (conv layers): False (default): channel means and the ratio rho for stride and
            padding, as the paper. True: per-tap means (:func:`equinorm_kernels.tap_mean`), one per
            input channel and kernel tap, so that each output channel's outputs sum to zero over the
            batch and its positive weights contribute exactly N x (output positions) for the
            convolution actually run (zero padding, stride, dilation, any padding mode); no ratio;
            ``running_mean`` is then (in, *kernel).

    Parameters ``weight`` (as ``{base}``), ``gain`` (out,) and ``bias`` (out,) (the affine after the
    normalization); buffer ``running_mean`` (in,), the running average of the statistic (of |x|
    with "abs_mean"). Inputs as ``{base}``, of any sign with "abs_mean" (ReLU outputs, raw pixels
    and linear-bottleneck outputs alike); any float dtype (statistics in float32), NCHW or channels_last.
    Differentiable in the input (through the batch means), ``weight``, ``gain`` and ``bias``.

    In eval mode the weight is built from ``running_mean`` and the input is not read for statistics,
    so it is not value-checked: NaN/Inf in it propagate to the output as in ``{base}``. A layer
    without output channels is accepted as ``{base}`` accepts it and runs as ``{base}`` does.
"""


class EquiNormConv1d(_EquiNormConvNd, nn.Conv1d):
    _spatial_dims = 1
    _plain_class = nn.Conv1d
    __doc__ = "nn.Conv1d with EquiNorm weights." + _LAYER_OPTIONS_DOC.format(base="nn.Conv1d")


class EquiNormConv2d(_EquiNormConvNd, nn.Conv2d):
    _spatial_dims = 2
    _plain_class = nn.Conv2d
    __doc__ = "nn.Conv2d with EquiNorm weights." + _LAYER_OPTIONS_DOC.format(base="nn.Conv2d")


class EquiNormConv3d(_EquiNormConvNd, nn.Conv3d):
    _spatial_dims = 3
    _plain_class = nn.Conv3d
    __doc__ = "nn.Conv3d with EquiNorm weights." + _LAYER_OPTIONS_DOC.format(base="nn.Conv3d")


class EquiNormLinear(EquiNormLayer, nn.Linear):
    __doc__ = "nn.Linear with EquiNorm weights (ratio 1)." + _LAYER_OPTIONS_DOC.format(base="nn.Linear")
    _spatial_dims = 0
    _plain_class = nn.Linear
    _one_call_field = "linear_train_forward"  # (N, C) inputs: x.dim() == _spatial_dims + 2

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        mode: str = "single_pass",
        momentum: float | None = 0.1,
        stats_fraction: float = 1.0,
        eps: float = 1e-5,
        backend: str = "auto",
        statistic: str = "abs_mean",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_equinorm(mode, momentum, stats_fraction, eps, backend, statistic)

    def _run_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.bias)

    def _plain_kwargs(self) -> dict:
        return dict(in_features=self.in_features, out_features=self.out_features)
