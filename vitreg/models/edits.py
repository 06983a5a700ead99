"""Edits of a running backbone: rewrite a block's output tokens or its FFN neurons while the forward runs.

Interventions (test-time registers, replacement ablations) change what one block hands the next, and
nothing else; the model's code and weights stay as they are. An edit is a function of the batch's tensor
in the model's token layout:

- an output edit gets block ``b``'s output tokens (B, T, D) and returns their replacement;
- a neuron edit gets block ``b``'s FFN hidden activation after its nonlinearity (B, T, hidden) — the
  neurons, SwiGLU's ``silu(x1) * x2`` too — and returns the replacement the FFN's output projection reads.

Edits run on single batches (``forward_features`` on a tensor, ``iter_layers`` and what is built on it).
The packed multi-crop forward and stochastic depth's row subsets change what a block sees, so both are
refused with a clear error rather than edited wrongly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

TokenEdit = Callable[[Tensor], Tensor]
NeuronEdit = Callable[[Tensor], Tensor]


class EditHandle:
    """The hooks of one set of edits; ``remove()`` takes them all off (also as a context manager)."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> EditHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _single_batch(args: tuple, what: str) -> Tensor:
    if len(args) > 1 and args[1] is not None:
        raise RuntimeError(
            f"{what} edits apply to one batch at a time; the packed multi-crop forward (forward_features on a list "
            "of batches) is not supported: run each batch on its own"
        )
    x = args[0]
    if x.ndim != 3:
        raise RuntimeError(f"{what} edits expect a block input of shape (B, T, D), got {tuple(x.shape)}")
    return x


def _checked(edit: Callable[[Tensor], Tensor], x: Tensor, what: str, block: int) -> Tensor:
    out = edit(x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the {what} edit of block {block} must return a tensor of shape {tuple(x.shape)}, got {got}")
    return out.to(x.dtype)


def attach_edits(
    blocks: nn.ModuleList,
    outputs: Mapping[int, TokenEdit] | None = None,
    neurons: Mapping[int, NeuronEdit] | None = None,
) -> EditHandle:
    """Hook ``outputs[b]`` on block ``b``'s output and ``neurons[b]`` on its FFN neurons (block indices
    already resolved). Edits of several handles on one block run in the order they were attached."""
    handles: list[RemovableHandle] = []
    for b, edit in (outputs or {}).items():

        def on_output(_module: nn.Module, args: tuple, output: Tensor, edit=edit, b=b) -> Tensor:
            _single_batch(args, "output")
            return _checked(edit, output, "output", b)

        handles.append(blocks[b].register_forward_hook(on_output))
    for b, edit in (neurons or {}).items():
        shape: list[tuple[int, int]] = []  # the (B, T) of the batch the block runs now

        def remember(_module: nn.Module, args: tuple, shape=shape) -> None:
            shape[:] = [tuple(_single_batch(args, "neuron").shape[:2])]

        def on_neurons(_module: nn.Module, args: tuple, edit=edit, b=b, shape=shape) -> tuple:
            hidden = args[0]  # (B*T, hidden): the block runs its FFN on flattened rows
            batch, tokens = shape[0]
            if hidden.shape[0] != batch * tokens:
                raise RuntimeError(
                    f"block {b}'s FFN saw {hidden.shape[0]} rows, not {batch}x{tokens}: stochastic depth drops rows "
                    "in training mode; neuron edits need model.eval() or a model without drop path"
                )
            edited = _checked(edit, hidden.view(batch, tokens, -1), "neuron", b)
            return (edited.reshape(hidden.shape), *args[1:])

        handles.append(blocks[b].register_forward_pre_hook(remember))
        handles.append(blocks[b].mlp.output_proj.register_forward_pre_hook(on_neurons))
    return EditHandle(handles)
