"""Where each kind of token sits in a backbone's sequence ``[CLS, reg_1..reg_R, patch_1..patch_P]``.

Consumers (telemetry, evaluation, probes) slice tokens and attention rows through a ``TokenLayout``
rather than by hand, so the layout is written down once, next to the model that defines it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    num_registers: int

    @property
    def num_prefix(self) -> int:
        """CLS + registers: the tokens before the patches."""
        return 1 + self.num_registers

    @property
    def registers_slice(self) -> slice:
        return slice(1, self.num_prefix)

    @property
    def patches_slice(self) -> slice:
        return slice(self.num_prefix, None)

    def cls(self, tokens: Tensor, dim: int = 1) -> Tensor:
        """The CLS token along ``dim`` (removed): (B, T, D) -> (B, D)."""
        return tokens.select(dim, 0)

    def registers(self, tokens: Tensor, dim: int = 1) -> Tensor:
        """The register tokens along ``dim``: (B, T, D) -> (B, R, D)."""
        return tokens.narrow(dim, 1, self.num_registers)

    def prefix(self, tokens: Tensor, dim: int = 1) -> Tensor:
        """CLS and registers along ``dim``: (B, T, D) -> (B, 1 + R, D)."""
        return tokens.narrow(dim, 0, self.num_prefix)

    def patches(self, tokens: Tensor, dim: int = 1) -> Tensor:
        """The patch tokens along ``dim``: (B, T, D) -> (B, P, D)."""
        return tokens.narrow(dim, self.num_prefix, tokens.shape[dim] - self.num_prefix)

    def split(self, tokens: Tensor, dim: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """``(cls, registers, patches)`` along ``dim``."""
        return self.cls(tokens, dim), self.registers(tokens, dim), self.patches(tokens, dim)
