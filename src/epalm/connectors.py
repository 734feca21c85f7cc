"""The only trainable parts of eP-ALM: connectors, soft prompts and adapters.

Shapes: ``d_enc`` encoder width, ``d`` the LM's hidden width (the input width of its decoder
layers), ``k`` encoder layers read, ``P`` prompt length.
"""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    """Project per-layer encoder tokens ``(B, k, d_enc)`` to LM tokens ``(B, k, d)``.

    ``shared=True``: one Linear for every level (eP-ALM lin / pt / pt-L).
    ``shared=False``: one Linear per encoder level (eP-ALM, "multiple connections").
    Submodule names (``linears.{i}``) are the checkpoint keys.
    """

    def __init__(self, d_enc: int, d: int, num_tokens: int, shared: bool) -> None:
        super().__init__()
        self.shared = shared
        self.num_tokens = num_tokens
        self.linears = nn.ModuleList([nn.Linear(d_enc, d) for _ in range(1 if shared else num_tokens)])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"encoder tokens must be (batch, k, dim), got {tuple(tokens.shape)}")
        if tokens.shape[-1] != self.linears[0].in_features:
            raise ValueError(
                f"encoder tokens have dim {tokens.shape[-1]} but the connector expects "
                f"{self.linears[0].in_features}"
            )
        if self.shared:
            return self.linears[0](tokens)
        if tokens.shape[1] != len(self.linears):
            raise ValueError(f"got {tokens.shape[1]} encoder tokens for {len(self.linears)} per-layer connectors")
        return torch.stack([lin(tokens[:, i]) for i, lin in enumerate(self.linears)], dim=1)


class SoftPrompt(nn.Module):
    """``P`` trainable tokens, optionally reparametrised by Linear-Tanh-Linear (release: mid = d).

    The release implements the prompt as an Embedding over ``0..P-1``; we store the same matrix.
    """

    def __init__(self, d: int, length: int = 10, mlp: bool = True, mid: int | None = None) -> None:
        super().__init__()
        self.length = length
        self.embedding = nn.Embedding(length, d)
        self.mlp = nn.Sequential(nn.Linear(d, mid or d), nn.Tanh(), nn.Linear(mid or d, d)) if mlp else None

    def forward(self, batch_size: int) -> torch.Tensor:
        e = self.embedding.weight  # (P, d)
        if self.mlp is not None:
            e = self.mlp(e)
        return e.unsqueeze(0).expand(batch_size, -1, -1)  # (B, P, d)


class DeepPrompt(nn.Module):
    """A separate soft prompt written into the prompt positions at the input of every listed layer."""

    def __init__(self, d: int, layers: list[int], length: int = 10, mlp: bool = False) -> None:
        super().__init__()
        self.layers = list(layers)
        self.length = length
        self.prompts = nn.ModuleList([SoftPrompt(d, length, mlp) for _ in self.layers])

    def forward(self, batch_size: int) -> dict[int, torch.Tensor]:
        return {layer: p(batch_size) for layer, p in zip(self.layers, self.prompts)}


class Adapter(nn.Module):
    """Sequential bottleneck adapter ``x + up(relu(down(x)))`` (Houlsby/MAGMA), reduction 8.

    ``up`` starts at zero so training starts from the unchanged frozen LM.
    """

    def __init__(self, d: int, reduction: int = 8) -> None:
        super().__init__()
        self.down = nn.Linear(d, max(1, d // reduction))
        self.up = nn.Linear(max(1, d // reduction), d)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class LayerAdapters(nn.Module):
    """One adapter after self-attention and one after the feed-forward block of a decoder layer."""

    def __init__(self, d: int, reduction: int = 8) -> None:
        super().__init__()
        self.attn = Adapter(d, reduction)
        self.ffn = Adapter(d, reduction)
