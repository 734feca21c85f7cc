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


# ---------------------------------------------------------------------------- token connectors (DePALM)
# The connectors below read *all* the encoder's last-layer tokens ``(B, N, d_enc)`` (CLS + patches)
# and return ``K`` tokens of the LM's width ``(B, K, d)``, written into K slots (EPALMConfig
# ``connector`` / ``num_visual_tokens``). DePALM (Vallaeys et al. 2024) compares them to eP-ALM's.


class MapperBlock(nn.Module):
    """Pre-norm block: the queries attend to ``[encoder tokens ; queries]`` (cross- and self-attention
    in one softmax), then a feed-forward layer. Both are residual on the queries."""

    def __init__(self, width: int, num_heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Linear(ffn_mult * width, width))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.norm_attn(torch.cat([tokens, queries], dim=1))
        q = kv[:, tokens.shape[1]:]
        queries = queries + self.attn(q, kv, kv, need_weights=False)[0]
        return queries + self.ffn(self.norm_ffn(queries))


class QueryMapper(nn.Module):
    """Learned-query transformer mapper (DePALM's "QP"): ``K`` learned queries read the encoder's
    tokens through ``num_layers`` :class:`MapperBlock` s; a LayerNorm and a Linear bring them to
    the LM's width. ``width`` (default ``d_enc``) is the mapper's inner width."""

    def __init__(self, d_enc: int, d: int, num_queries: int, num_layers: int = 2, num_heads: int = 8,
                 width: int | None = None) -> None:
        super().__init__()
        width = width or d_enc
        if width % num_heads:
            raise ValueError(f"mapper_dim={width} is not divisible by mapper_heads={num_heads}")
        self.num_tokens = num_queries
        self.in_proj = nn.Linear(d_enc, width)
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(MapperBlock(width, num_heads) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens(tokens, self.in_proj.in_features)
        x = self.in_proj(tokens)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, x)
        return self.proj(self.norm_out(q))


class AvgPoolResampler(nn.Module):
    """Average-pool the patch tokens to ``K`` tokens, then project them to the LM's width.

    Token 0 (the [CLS] of ViT-like encoders) is dropped. A square patch grid is pooled in 2-D when
    ``K`` is a square too (14x14 -> 7x7 for ViT-B/16 and K=49, row-major); otherwise the patch
    sequence is pooled in 1-D (``adaptive_avg_pool1d``: K nearly equal consecutive bins).
    """

    def __init__(self, d_enc: int, d: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(d_enc, d)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, 1:]
        b, n, dim = patches.shape
        if n < self.num_tokens:
            raise ValueError(f"cannot average-pool {n} patch tokens to num_visual_tokens={self.num_tokens}")
        grid, k = _isqrt(n), _isqrt(self.num_tokens)
        if grid * grid == n and k * k == self.num_tokens:
            image = patches.transpose(1, 2).reshape(b, dim, grid, grid)
            return torch.nn.functional.adaptive_avg_pool2d(image, k).flatten(2).transpose(1, 2)
        return torch.nn.functional.adaptive_avg_pool1d(patches.transpose(1, 2), self.num_tokens).transpose(1, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens(tokens, self.proj.in_features)
        return self.proj(self.pool(tokens))


class LinearResampler(nn.Module):
    """A learned linear map over the token axis (``N`` encoder tokens -> ``K``), then the
    projection to the LM's width. ``N`` (CLS included) is fixed when the model is built."""

    def __init__(self, d_enc: int, d: int, num_in: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.mix = nn.Linear(num_in, num_tokens)
        self.proj = nn.Linear(d_enc, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _check_tokens(tokens, self.proj.in_features)
        if tokens.shape[1] != self.mix.in_features:
            raise ValueError(f"the linear resampler was built for {self.mix.in_features} encoder tokens "
                             f"(encoder_tokens) but got {tokens.shape[1]}")
        return self.proj(self.mix(tokens.transpose(1, 2)).transpose(1, 2))


def _check_tokens(tokens: torch.Tensor, d_enc: int) -> None:
    if tokens.ndim != 3:
        raise ValueError(f"encoder tokens must be (batch, tokens, dim), got {tuple(tokens.shape)}")
    if tokens.shape[-1] != d_enc:
        raise ValueError(f"encoder tokens have dim {tokens.shape[-1]} but the connector expects {d_enc}")


def _isqrt(n: int) -> int:
    return int(round(n ** 0.5))


TOKEN_CONNECTORS = ("qpmapper", "avgpool", "linear_resampler")
