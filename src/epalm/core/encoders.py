"""Frozen perceptual encoders with one interface: the [CLS] token of each of the last k layers.

eP-ALM reads a unimodal encoder (ViT, TimeSformer, AST, Whisper, ...) only through a few
per-layer summary tokens. Every encoder here is wrapped, never forked: forward hooks on the
encoder's own layer stack record each layer's output, and the encoder's final norm is applied
to each recorded output, exactly as the authors' release does (their ViT fork records
``norm(x)`` after every block).

``encoder(x)`` returns ``(batch, k, dim)``. With ``all_tokens=True`` it returns every token of
the last layer (after the final norm), ``(batch, n_tokens, dim)``: MAGMA*'s input (and, with
``token_layers=L``, those of the last L layers concatenated: DePALM's QP mapper over chosen layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from epalm.core.config import check_model_path

Pooling = Literal["cls", "mean"]

_NORM_NAMES = ("layernorm", "post_layernorm", "layer_norm", "norm", "ln_f", "fc_norm")


def find_layer_stack(model: nn.Module, num_layers: int | None = None) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of identical blocks in ``model`` (the transformer's layer stack).

    Works for every transformers/timm architecture we know without naming them; ``num_layers``
    (from the config) disambiguates when several lists exist.
    """
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if num_layers is not None and len(module) != num_layers:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"cannot find the layer stack of {type(model).__name__}: no nn.ModuleList of identical blocks"
            + (f" with {num_layers} entries (config.num_hidden_layers)" if num_layers else "")
            + ". Wrap it with a custom Encoder subclass."
        )
    return best


def find_final_norm(model: nn.Module) -> nn.Module:
    """The encoder's final normalisation (identity if it has none)."""
    for holder in (model, getattr(model, "vision_model", None), getattr(model, "encoder", None)):
        if holder is None:
            continue
        for name in _NORM_NAMES:
            module = getattr(holder, name, None)
            if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
                return module
    return nn.Identity()


class Encoder(nn.Module):
    """A frozen encoder returning per-layer summary tokens ``(batch, k, dim)``.

    Args:
        model: the backbone (transformers or timm module).
        num_layers: k, how many of the last layers to read (eP-ALM: 6).
        pooling: "cls" takes token ``cls_index``; "mean" averages all tokens (Whisper, SigLIP).
        hidden_size: output dim; read from the config when omitted.
        image_size / num_channels: expected input geometry, checked with a clear error.
    """

    modality: str = "image"

    def __init__(
        self,
        model: nn.Module,
        num_layers: int = 6,
        pooling: Pooling = "cls",
        cls_index: int = 0,
        hidden_size: int | None = None,
        image_size: int | tuple[int, int] | None = None,
        num_channels: int | None = None,
        final_norm: nn.Module | None = None,
        call: Callable[[nn.Module, torch.Tensor], object] | None = None,
        modality: str = "image",
    ) -> None:
        super().__init__()
        if isinstance(getattr(model, "pooler", None), nn.Module):
            # unused (we read per-layer tokens) and randomly initialised when a checkpoint lacks it:
            # it would only cost compute and make the weights' fingerprint unstable
            model.pooler = None
        self.model = model
        cfg = getattr(model, "config", None)
        total = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "encoder_layers", None)
        self.layer_stack_name, self.layers = find_layer_stack(model, total)
        if not 1 <= num_layers <= len(self.layers):
            raise ValueError(
                f"num_encoder_layers={num_layers} but the encoder has {len(self.layers)} layers"
            )
        self.num_layers = num_layers
        self.pooling = pooling
        self.cls_index = cls_index
        self.final_norm = final_norm if final_norm is not None else find_final_norm(model)
        self.hidden_size = hidden_size or getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if self.hidden_size is None:
            raise ValueError(f"cannot infer the hidden size of {type(model).__name__}; pass hidden_size=")
        if image_size is None:
            image_size = getattr(cfg, "image_size", None)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.num_channels = num_channels or getattr(cfg, "num_channels", None)
        self._call = call or (lambda m, x: m(x))
        self.modality = modality
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Encoder":  # frozen: always eval (no dropout, fixed BN stats)
        return super().train(False)

    def check_input(self, x: torch.Tensor) -> None:
        if self.modality != "image":
            return
        if x.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(x.shape)}")
        if self.num_channels is not None and x.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {x.shape[1]} channels but the encoder expects {self.num_channels} "
                f"(shape {tuple(x.shape)}; convert images to RGB)"
            )
        if self.image_size is not None and tuple(x.shape[-2:]) != tuple(self.image_size):
            raise ValueError(
                f"pixel_values is {x.shape[-2]}x{x.shape[-1]} but the encoder expects "
                f"{self.image_size[0]}x{self.image_size[1]}; resize the images (epalm.data does this)"
            )

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        return h[:, self.cls_index] if self.pooling == "cls" else h.mean(dim=1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, all_tokens: bool = False, token_layers: int = 1) -> torch.Tensor:
        """``(B, k, d)`` per-layer summary tokens; ``all_tokens``: every token of the last
        ``token_layers`` layers (each after the final norm), concatenated: ``(B, token_layers * N, d)``."""
        self.check_input(x)
        if all_tokens and not 1 <= token_layers <= len(self.layers):
            raise ValueError(f"token_layers={token_layers} but the encoder has {len(self.layers)} layers")
        recorded: list[torch.Tensor] = []
        first = len(self.layers) - (token_layers if all_tokens else self.num_layers)

        def record(_module: nn.Module, _args: object, output: object) -> None:
            recorded.append(output[0] if isinstance(output, (tuple, list)) else output)

        handles = [layer.register_forward_hook(record) for layer in self.layers[first:]]
        try:
            self._call(self.model, x)
        finally:
            for handle in handles:
                handle.remove()
        if all_tokens:
            return torch.cat([self.final_norm(h) for h in recorded], dim=1)
        return torch.stack([self._pool(h) for h in recorded], dim=1)


class FrameWiseEncoder(nn.Module):
    """Any image encoder applied to each frame of a video; tokens averaged over time.

    Lets an image-trained eP-ALM answer questions about videos zero-shot (paper Table 6).
    Input ``(batch, frames, channels, height, width)``; a batch of images ``(batch, C, H, W)`` is a
    one-frame video, so the same model trains on images and answers about videos.
    """

    modality = "video"

    def __init__(self, image_encoder: Encoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.hidden_size = image_encoder.hidden_size
        self.num_layers = image_encoder.num_layers

    @torch.no_grad()
    def forward(self, video: torch.Tensor, all_tokens: bool = False, token_layers: int = 1) -> torch.Tensor:
        if video.ndim == 4:
            video = video.unsqueeze(1)
        if video.ndim != 5:
            raise ValueError(f"video must be (batch, frames, channels, height, width), got {tuple(video.shape)}")
        b, t = video.shape[:2]
        extra = {"token_layers": token_layers} if token_layers != 1 else {}
        tokens = self.image_encoder(video.flatten(0, 1), all_tokens=all_tokens, **extra)  # (b*t, k, d)
        return tokens.view(b, t, *tokens.shape[1:]).mean(dim=1)


@dataclass(frozen=True)
class EncoderSpec:
    """How to wrap one family of transformers encoders."""

    modality: str
    pooling: Pooling = "cls"
    call: Callable[[nn.Module, torch.Tensor], object] | None = None


def _pixel_call(model: nn.Module, x: torch.Tensor) -> object:
    return model(pixel_values=x)


def _input_values_call(model: nn.Module, x: torch.Tensor) -> object:
    return model(input_values=x)


def _whisper_call(model: nn.Module, x: torch.Tensor) -> object:
    return model(input_features=x)


_HF_SPECS: dict[str, EncoderSpec] = {
    "vit": EncoderSpec("image", call=_pixel_call),
    "deit": EncoderSpec("image", call=_pixel_call),
    "dinov2": EncoderSpec("image", call=_pixel_call),
    "clip_vision_model": EncoderSpec("image", call=_pixel_call),
    "siglip_vision_model": EncoderSpec("image", pooling="mean", call=_pixel_call),
    "timesformer": EncoderSpec("video", call=_pixel_call),
    "audio-spectrogram-transformer": EncoderSpec("audio", call=_input_values_call),
    "whisper": EncoderSpec("audio", pooling="mean", call=_whisper_call),
}


def wrap_hf_encoder(model: nn.Module, num_layers: int = 6) -> Encoder:
    """Wrap a transformers vision/video/audio model (ViT, CLIP/SigLIP vision, DINOv2, TimeSformer, AST, Whisper)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "clip":
        model = model.vision_model
        model_type = "clip_vision_model"
    if model_type == "siglip":
        model = model.vision_model
        model_type = "siglip_vision_model"
    if model_type == "whisper" and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    spec = _HF_SPECS.get(model_type)
    if spec is None:
        raise ValueError(f"unsupported encoder model_type {model_type!r}; supported: {sorted(_HF_SPECS)}")
    kwargs: dict = {}
    if spec.modality != "image":
        kwargs["image_size"] = None
    if model_type == "whisper":
        kwargs["hidden_size"] = model.config.d_model
    if model_type == "timesformer":
        kwargs["num_channels"] = None
    return Encoder(model, num_layers=num_layers, pooling=spec.pooling, call=spec.call,
                   modality=spec.modality, **kwargs)


def wrap_timm_vit(model: nn.Module, num_layers: int = 6) -> Encoder:
    """Wrap a timm VisionTransformer: hooks on ``blocks``, final ``norm``, CLS at index 0."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return Encoder(
        model,
        num_layers=num_layers,
        hidden_size=model.embed_dim,
        image_size=tuple(size) if size is not None else None,
        num_channels=3,
        final_norm=model.norm,
        call=lambda m, x: m.forward_features(x),
    )


def load_encoder(name: str, num_layers: int = 6, pretrained: bool = True, **kwargs) -> nn.Module:
    """Build a frozen encoder from a timm model name, a transformers id/path or a registry name.

    ``"timm:vit_base_patch16_224"`` or a bare timm name (``vit_base_patch16_224``) uses timm
    (``pip install 'epalm[timm]'``); ``"weights:<name>"`` a registry weight of :mod:`epalm.weights`
    (converted on first use, e.g. ``weights:dinov2-small``); anything else goes to
    ``transformers.AutoModel``. ``"framewise:<name>"`` wraps an image encoder frame by frame for
    video; ``"whisper-clip:<name>"`` wraps a Whisper encoder as :class:`WhisperClipEncoder`
    (``kwargs``: ``context_frames``, ``pooling``).
    """
    if name.startswith("framewise:"):
        inner = load_encoder(name.split(":", 1)[1], num_layers=num_layers, pretrained=pretrained, **kwargs)
        return FrameWiseEncoder(inner)
    if name.startswith("weights:"):
        from epalm.weights.registry import load_registry_encoder

        return load_registry_encoder(name.split(":", 1)[1], num_layers=num_layers, **kwargs)
    if name.startswith("whisper-clip:"):
        import json
        from pathlib import Path

        from transformers import AutoModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        clip = {k: kwargs.pop(k) for k in ("context_frames", "pooling") if k in kwargs}
        source = name.split(":", 1)[1]
        config_file = Path(source) / "config.json"
        saved = json.loads(config_file.read_text()).get("architectures") if config_file.is_file() else None
        cls = WhisperEncoder if saved == ["WhisperEncoder"] else AutoModel  # an encoder saved on its own
        return WhisperClipEncoder(cls.from_pretrained(source, **kwargs).eval(), num_layers=num_layers, **clip)
    if name.startswith("timm:") or ("/" not in name and name.startswith(("vit_", "deit_", "eva"))):
        try:
            import timm
        except ImportError as err:  # pragma: no cover - depends on the extra
            raise ImportError(f"encoder {name!r} needs timm: pip install 'epalm[timm]'") from err
        model = timm.create_model(name.removeprefix("timm:"), pretrained=pretrained, num_classes=0, **kwargs)
        return wrap_timm_vit(model, num_layers)
    from transformers import AutoConfig, AutoModel

    check_model_path(name, "model.encoder")
    if pretrained:
        model = AutoModel.from_pretrained(name, **kwargs)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(name))
    return wrap_hf_encoder(model, num_layers)


def count_tokens(encoder: nn.Module, token_layers: int = 1) -> int:
    """How many tokens ``encoder(x, all_tokens=True, token_layers=...)`` returns for one input.

    Counted by running the encoder once on a zero image of its expected geometry (on its own
    device: on the meta device this allocates nothing); only image encoders (and frame-wise video
    over them) have a known input geometry.
    """
    inner = encoder.image_encoder if isinstance(encoder, FrameWiseEncoder) else encoder
    size, channels = getattr(inner, "image_size", None), getattr(inner, "num_channels", None)
    if getattr(inner, "modality", None) != "image" or size is None or channels is None:
        raise ValueError(f"cannot count the tokens of a {getattr(inner, 'modality', type(inner).__name__)} "
                         "encoder without an input: set EPALMConfig.encoder_tokens")
    param = next(inner.parameters(), None)
    x = torch.zeros(1, channels, *size, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    return inner(x, all_tokens=True, **({"token_layers": token_layers} if token_layers != 1 else {})).shape[1]
class WhisperClipEncoder(Encoder):
    """Whisper's encoder on the first ``context_frames`` mel frames; each layer mean-pooled.

    ``context_frames < 3000`` truncates the encoder's (sinusoidal) position table **in place**.
    ``pooling="audio"`` averages only the positions whose mel frames rise above the clip's floor
    (the value the feature extractor gives to zero padding); ``"all"`` averages every position.
    """

    def __init__(self, whisper: nn.Module, num_layers: int = 6, context_frames: int = 3000,
                 pooling: str = "audio") -> None:
        if pooling not in ("audio", "all"):
            raise ValueError(f"pooling must be 'audio' or 'all', got {pooling!r}")
        enc = whisper.get_encoder() if hasattr(whisper, "get_encoder") else whisper
        full = enc.config.max_source_positions * 2
        if context_frames % 2 or not 2 <= context_frames <= full:
            raise ValueError(f"context_frames must be even and in [2, {full}], got {context_frames}")
        positions = context_frames // 2
        if positions < enc.config.max_source_positions:
            table = enc.embed_positions.weight.data[:positions].clone()
            enc.embed_positions = nn.Embedding(positions, table.shape[1]).requires_grad_(False)
            enc.embed_positions.weight.data.copy_(table)
            enc.config.max_source_positions = positions
        num_layers = min(num_layers, enc.config.encoder_layers)
        super().__init__(enc, num_layers=num_layers, pooling="mean", call=_whisper_call, modality="audio",
                         hidden_size=enc.config.d_model, image_size=None)
        self.context_frames = context_frames
        self.audio_pooling = pooling
        self._mask: torch.Tensor | None = None

    @staticmethod
    def audio_positions(mel: torch.Tensor) -> torch.Tensor:
        """``(B, frames/2)`` bool: encoder positions (2 mel frames each) holding audio."""
        floor = mel.amin(dim=(1, 2), keepdim=True)
        frames = (mel > floor + 1e-4).any(dim=1)
        pos = frames.view(mel.shape[0], -1, 2).any(-1)
        pos[:, 0] |= ~pos.any(1)  # a silent clip still pools one position
        return pos

    @torch.no_grad()
    def forward(self, x: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.context_frames:
            raise ValueError(f"expected log-mels (batch, mel bins, {self.context_frames}), got {tuple(x.shape)}")
        self._mask = self.audio_positions(x) if self.audio_pooling == "audio" else None
        try:
            return super().forward(x, all_tokens=all_tokens)
        finally:
            self._mask = None

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(h)
        if self._mask is None:
            return h.mean(dim=1)
        m = self._mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1)
