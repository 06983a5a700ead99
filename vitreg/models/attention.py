"""Multi-head self-attention with interchangeable kernels.

Backends:
- ``sdpa``: ``F.scaled_dot_product_attention`` (default; PyTorch picks flash / cuDNN / mem-efficient).
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (DINOv2's training kernel); used only when
  the optional extra is installed *and* the tensors are on CUDA, otherwise SDPA runs instead.
- ``math``: an explicit ``softmax(q k^T / sqrt(d)) v`` that can also return the probabilities,
  which the telemetry needs (fused kernels never materialise them).
- ``auto``: xformers when installed and on CUDA (installing the extra is taken as opting in),
  else SDPA.

Each layer resolves its kernel once per device type and keeps it (``Attention.kernels``); the choice is
logged once per (requested, resolved) pair, and a missing xformers never raises. Resolve before
``torch.compile`` (``resolve_attention_kernels``) so traced code only reads the kept name: the check for
xformers (an import) and the log call cannot be traced and would break the graph.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

AttnBackend = Literal["auto", "sdpa", "xformers", "math"]
ATTN_BACKENDS: tuple[str, ...] = ("auto", "sdpa", "xformers", "math")
# "kv": a learned key and value per head that every query can attend to (an attention-bias sink, Sun et al.
# 2024; DINOv3 appendix A compares it with registers); it has no query and produces no output token.
ATTN_BIASES: tuple[str, ...] = ("none", "kv")


@functools.cache
def xformers_available() -> bool:
    """True when ``xformers.ops.memory_efficient_attention`` can be imported."""
    try:
        from xformers.ops import memory_efficient_attention  # noqa: F401
    except Exception:  # ImportError, or a broken build raising anything at import
        return False
    return True


@functools.cache
def _log_choice(requested: str, resolved: str, reason: str) -> None:
    level = logging.WARNING if requested == "xformers" and resolved != "xformers" else logging.INFO
    logger.log(level, "attention backend %r -> %r (%s)", requested, resolved, reason)


def check_backend(name: str) -> str:
    """Validate a backend name, raising a ValueError that lists the valid ones."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {list(ATTN_BACKENDS)}, got {name!r}")
    return name


def resolve_backend(requested: str, device: torch.device) -> str:
    """The kernel that will actually run for ``requested`` on ``device``."""
    if requested in ("sdpa", "math"):
        return requested
    if device.type != "cuda":
        resolved, reason = "sdpa", f"xformers has no kernels for {device.type} tensors"
    elif not xformers_available():
        resolved, reason = "sdpa", "xformers is not installed (pip install -e .[xformers])"
    else:
        resolved, reason = "xformers", "installed and on CUDA"
    if not torch.compiler.is_compiling():  # a logger call in traced code is a graph break
        _log_choice(requested, resolved, reason)
    return resolved


def resolve_attention_kernels(module: nn.Module, device: torch.device) -> None:
    """Resolve (and log) the kernel of every ``Attention`` in ``module`` for ``device``, outside traced code.

    Call it before ``torch.compile`` on the device the model will run on; eager code resolves on first use.
    """
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.kernel(device)


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Explicit attention on (B, H, N, d) tensors; returns (output, probabilities (B, H, N, N))."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return probs @ v, probs


def multihead_attention(q: Tensor, k: Tensor, v: Tensor, backend: str) -> Tensor:
    """Attention on (B, N, H, d) tensors with a resolved backend; returns (B, N, H, d)."""
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        return memory_efficient_attention(q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if backend == "math":
        out, _ = math_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """DINOv2's attention: fused qkv projection (order B, N, 3, H, d), 1/sqrt(d) scale, output proj.

    Parameter names (``qkv``, ``proj``) match DINOv2 so official state dicts load unchanged.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: str = "sdpa",
        attn_bias: str = "none",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        if attn_bias not in ATTN_BIASES:
            raise ValueError(f"attn_bias must be one of {list(ATTN_BIASES)}, got {attn_bias!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = check_backend(backend)
        self.kernels: dict[str, str] = {}  # device type -> the kernel ``backend`` resolved to there
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        # The sink starts at zero key and zero value: it takes softmax mass exp(0) / (Z + 1) and gives nothing,
        # so a fresh model differs from the plain one only by that renormalisation (see ``with_sink``).
        self.sink_key = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if attn_bias == "kv" else None
        self.sink_value = nn.Parameter(torch.zeros(num_heads, self.head_dim)) if attn_bias == "kv" else None

    def kernel(self, device: torch.device) -> str:
        """The kernel this layer runs on ``device``: resolved on first use, then read from ``kernels``."""
        kernel = self.kernels.get(device.type)
        if kernel is None:
            kernel = self.kernels[device.type] = resolve_backend(self.backend, device)
        return kernel

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        return qkv.unbind(2)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        return self.forward_groups(x.reshape(-1, x.shape[-1]), [x.shape[:2]]).view_as(x)

    def forward_groups(self, tokens: Tensor, groups: list[tuple[int, int]]) -> Tensor:
        """Attention over several token groups packed into one (sum B_i*N_i, D) tensor.

        The projections run once over all tokens; attention runs once per group (B_i, N_i), so
        each image attends only to its own tokens. This is the multi-crop fast path.
        """
        backend = self.kernel(tokens.device)
        qkv = self.qkv(tokens)
        outs = []
        for chunk, (b, n) in zip(qkv.split([b * n for b, n in groups]), groups, strict=True):
            q, k, v = chunk.reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
            k, v = self.with_sink(k, v)
            outs.append(multihead_attention(q, k, v, backend).reshape(b * n, -1))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def with_sink(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, N, H, d) with the sink's appended as key/value N (one more than the queries):
        every query can put attention on it; it has no query, so the output keeps N tokens."""
        if self.sink_key is None:
            return k, v
        b = k.shape[0]
        sink_k = self.sink_key.to(k.dtype).expand(b, 1, -1, -1)
        sink_v = self.sink_value.to(v.dtype).expand(b, 1, -1, -1)
        return torch.cat([k, sink_k], dim=1), torch.cat([v, sink_v], dim=1)

    def attention_probs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Attention probabilities for input ``x`` (B, N, D), through the math path: over the tokens
        (B, H, N, N), and on the sink (B, H, N) or None without one. For inspection (telemetry): the fused
        kernels used in training never materialise them."""
        q, k, v = self._qkv(x)
        k, _ = self.with_sink(k, v)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        scale = 1.0 / math.sqrt(q.shape[-1])
        probs = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        n = x.shape[1]
        return probs[..., :n], (probs[..., n] if self.sink_key is not None else None)
