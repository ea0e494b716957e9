"""The two small heads COMET puts on its encoder: a learned mix of the encoder's layers, and a feed-forward estimator.

Parameter names follow unbabel-comet's modules (``scalar_parameters.N``, ``gamma``, ``ff.N``) so that
Unbabel's checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def sparsemax(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Sparsemax (Martins & Astudillo 2016): the Euclidean projection of ``x`` onto the simplex; low weights become 0."""
    x = x - x.max(dim=dim, keepdim=True)[0]  # as the entmax package does: the same rounding as comet
    z, _ = torch.sort(x, dim=dim, descending=True)
    k = torch.arange(1, x.shape[dim] + 1, device=x.device, dtype=x.dtype)
    view = [1] * x.dim()
    view[dim] = -1
    k = k.view(view)
    cumulative = z.cumsum(dim) - 1
    support = (k * z > cumulative).sum(dim=dim, keepdim=True)  # how many entries stay above 0
    tau = cumulative.gather(dim, support - 1) / support.to(x.dtype)
    return torch.clamp(x - tau, min=0)


class LayerwiseAttention(nn.Module):
    """``gamma * sum_k w_k * layer_k`` with ``w = softmax`` (or sparsemax) of one learned scalar per layer.

    With ``layer_norm`` each layer is first normalised over the unmasked positions of its row
    (one mean and variance per row, not per position), as comet does.
    """

    def __init__(self, num_layers: int, layer_norm: bool, transformation: str) -> None:
        super().__init__()
        self.layer_norm = layer_norm
        self.transform = sparsemax if transformation == "sparsemax" else torch.softmax
        self.scalar_parameters = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(num_layers)])
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, layers: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        weights = self.transform(torch.cat(list(self.scalar_parameters)), dim=0)
        if self.layer_norm:
            layers = [_masked_norm(t, mask.float()) for t in layers]
        mixed = sum(w * t for w, t in zip(weights.split(1), layers, strict=True))
        return self.gamma * mixed


def _masked_norm(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t`` (B x T x D) less its row mean over unmasked positions, over its row std (comet's order of operations)."""
    b = t.shape[0]
    broadcast = mask.unsqueeze(-1)
    masked = t * broadcast
    count = mask.sum(1) * t.shape[-1]
    mean = (masked.view(b, -1).sum(1) / count).view(b, 1, 1)
    variance = (((masked - mean) * broadcast) ** 2).view(b, -1).sum(1) / count
    return (t - mean) / torch.sqrt(variance + 1e-12).view(b, 1, 1)


class FeedForward(nn.Module):
    """Linear layers with an activation (and dropout) between them; comet's ``estimator``.

    Activation names are looked up as comet does: ``getattr(torch.nn, name.title())`` (``"Tanh"``, ``"Sigmoid"``).
    """

    def __init__(self, in_dim: int, hidden_sizes: Sequence[int], activations: str = "Tanh",
                 final_activation: str | None = None, dropout: float = 0.1, out_dim: int = 1) -> None:
        super().__init__()
        sizes = [in_dim, *hidden_sizes]
        modules: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            modules += [nn.Linear(a, b), activation(activations), nn.Dropout(dropout)]
        modules.append(nn.Linear(sizes[-1], out_dim))
        if final_activation is not None:
            modules.append(activation(final_activation))
        self.ff = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff(x.to(self.ff[0].weight.dtype))


def activation(name: str) -> nn.Module:
    module = getattr(nn, name.title(), None)
    if module is None:
        raise ValueError(f"{name!r} is not an activation in torch.nn")
    return module()
