"""The output contract every network keeps: logits ``(B, K, *spatial)``, or with deep supervision a list of
them, coarsest first and the full-resolution output last. Inference, export and tracking take the last one;
training weighs them all."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def final_output(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution prediction of a network that may return deep-supervision outputs.

    Examples:
        >>> import torch
        >>> final_output([torch.zeros(1, 2, 4, 4), torch.ones(1, 2, 8, 8)]).shape
        torch.Size([1, 2, 8, 8])
    """
    return output[-1] if isinstance(output, (list, tuple)) else output  # type: ignore[return-value]  # a tensor either way


def deep_supervision_loss(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                          output: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor,
                          decay: float = 0.5) -> torch.Tensor:
    """Loss of one output, or the weighted mean over deep-supervision outputs: each coarser output weighs
    ``decay`` (``train.deep_supervision_decay``) times the next finer one, the final output 1.

    Examples:
        >>> import torch
        >>> outputs = [torch.full((1,), 2.0), torch.full((1,), 1.0)]
        >>> float(deep_supervision_loss(lambda o, y: o.sum(), outputs, None, decay=0.5))  # (0.5 * 2 + 1) / 1.5
        1.3333333730697632
    """
    if isinstance(output, torch.Tensor):
        return loss_fn(output, label)
    weights = [decay ** (len(output) - 1 - i) for i in range(len(output))]
    total = weights[0] * loss_fn(output[0], label)
    for w, o in zip(weights[1:], output[1:]):
        total = total + w * loss_fn(o, label)
    return total / sum(weights)
