"""ENorm: equi-normalization of ReLU networks (Stock et al., ICLR 2019).

    ENorm(model, optimizer=None, *, c=1.0, p=2.0, schedule="sequential", include_bias=True,
          batchnorm="paper", optimizer_state="rescale")

Modules: ``graph`` finds the channel groups with torch.fx, ``sequential`` and ``release`` run the
two cycle schedules, ``optimizer_state`` keeps optimizer state consistent; the per-channel math
lives in :mod:`equinorm_kernels.reference.enorm`.
"""
from .normalizer import ENorm
from .plan import RescalingGroup

__all__ = ["ENorm", "RescalingGroup"]
