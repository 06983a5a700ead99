"""DINOv2's projection head, with DINOv2's parameter names so official head weights load unchanged."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``w = g * v / ||v||`` (norm over each output row).

    Written by hand instead of ``torch.nn.utils.weight_norm`` (deprecated, hook-based) or
    ``parametrizations.weight_norm`` (renames the parameters), so the names stay ``weight_g`` (K, 1) and
    ``weight_v`` (K, in) as in DINOv2 checkpoints and ``copy.deepcopy`` of a student gives a working teacher.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # v gets nn.Linear's default init (DINOv2 wraps a freshly built Linear); g = 1, not ||v||, as DINOv2 sets it.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int) -> nn.Module:
    if nlayers == 1:
        # A bare Linear, not a Sequential, so the keys are ``mlp.weight`` / ``mlp.bias`` as in DINOv2.
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP (Linear-GELU-...-Linear to the bottleneck) -> L2 normalise -> weight-normed prototypes (no bias).

    Keys: ``mlp.0/2/4.{weight,bias}`` (``mlp.{weight,bias}`` when ``nlayers=1``), ``last_layer.weight_g``,
    ``last_layer.weight_v``. No BatchNorm and no ``norm_last_layer`` freeze: as in DINOv2, ``weight_g`` is
    trainable and the last layer is only frozen through its learning-rate schedule.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Built after the MLP init, like DINOv2, so it keeps its own (nn.Linear default) init.
        self.out_dim = out_dim
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # 1e-12 underflows to 0 in fp16, so DINOv2 uses a larger floor there.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
