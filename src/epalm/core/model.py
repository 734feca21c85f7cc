"""EPALM: a frozen encoder + a frozen Hugging Face causal LM + a few trainable connectors.

    tokens  = encoder(media)                     (B, k, d_enc)   frozen, no grad
    visual  = connector(tokens)                  (B, k, d)       trainable
              (token connectors: all N encoder tokens (B, N, d_enc) -> K slots (B, K, d))
    prompt  = soft_prompt(B)                     (B, P, d)       trainable (variants with a prompt)
    logits  = lm([slot | prompt | text])         injection hooks write visual[k(i)] at layer i

Only trainable weights are saved (safetensors) with a JSON config that names the encoder and
the LM, like PEFT adapters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from epalm.core.config import EPALMConfig, check_model_path
from epalm.core.connectors import (
    AvgPoolResampler,
    Connector,
    DeepPrompt,
    LayerAdapters,
    LinearResampler,
    QueryMapper,
    SoftPrompt,
)
from epalm.core.encoders import count_tokens
from epalm.core.injection import (
    InjectionEngine,
    InjectionState,
    LMAnatomy,
    StopForward,
    attach_adapters,
    default_injection_range,
    injection_schedule,
)

WEIGHTS_NAME = "epalm_weights.safetensors"
CONFIG_NAME = "epalm_config.json"


@dataclass
class EPALMOutput(ModelOutput):
    """``forward``'s result, a ``transformers`` ``ModelOutput``: ``out.loss``, ``out["loss"]``, ``out[0]``."""

    loss: torch.Tensor | None = None  # scalar training objective
    logits: torch.Tensor | None = None  # (B, T, V) for the text positions only ((B, k, V) with logits_to_keep)
    loss_per_sample: torch.Tensor | None = None  # (B,) summed token cross-entropy
    num_label_tokens: torch.Tensor | None = None  # (B,)


class EPALM(nn.Module):
    """eP-ALM around any transformers causal LM (OPT, GPT-2, Llama, Qwen2/3, Gemma 3, SmolLM, ...).

    Args:
        lm: a ``*ForCausalLM`` loaded with ``attn_implementation`` "sdpa" or "eager".
        encoder: an ``epalm.core.encoders.Encoder`` (or ``FrameWiseEncoder``); ``None`` to train from
            cached features only (then pass ``encoder_dim``).
        config: the variant and injection settings.
    """

    def __init__(self, lm: nn.Module, encoder: nn.Module | None, config: EPALMConfig,
                 encoder_dim: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.lm = lm.requires_grad_(False).eval()
        self.encoder = encoder.requires_grad_(False).eval() if encoder is not None else None
        d_enc = encoder.hidden_size if encoder is not None else encoder_dim
        if d_enc is None:
            raise ValueError("pass an encoder or encoder_dim (the width of cached encoder features)")
        if encoder is not None and not config.needs_all_tokens and encoder.num_layers < config.num_encoder_layers:
            raise ValueError(
                f"the encoder returns {encoder.num_layers} layers but num_encoder_layers={config.num_encoder_layers}"
            )

        anatomy = LMAnatomy.of(lm)
        n_layers = len(anatomy.layers)
        if config.inject == "input":
            start, end, n_vis = 0, 1, 1
        else:
            d_start, d_end = default_injection_range(n_layers)
            start = d_start if config.inject_start is None else config.inject_start
            end = d_end if config.inject_end is None else config.inject_end
            # a token connector gives one set of K tokens: inserted at `start`, overwritten after
            n_vis = config.num_encoder_layers if config.connector == "linear" else 1
        if not (0 <= start < end <= n_layers):
            raise ValueError(
                f"injection layers [{start}, {end}) are out of range for an LM with {n_layers} layers "
                f"(need 0 <= inject_start < inject_end <= {n_layers})"
            )
        self.inject_start, self.inject_end = start, end
        self.schedule = injection_schedule(start, end, n_vis, config.text_step)
        self.engine = InjectionEngine(anatomy, self.schedule, start)
        d = self.engine.anatomy.hidden_size

        # ---- trainable parts
        self.connector = self._build_connector(config, encoder, d_enc, d, n_vis)
        self.prompt = None
        self.deep_prompt = None
        if config.prompt_len and config.deep_prompt:
            self.deep_prompt = DeepPrompt(d, list(range(n_layers)), config.prompt_len, config.prompt_mlp)
        elif config.prompt_len:
            self.prompt = SoftPrompt(d, config.prompt_len, config.prompt_mlp)
        self.adapters = None
        if config.adapters:
            self.adapters = nn.ModuleList(LayerAdapters(d, config.adapter_reduction) for _ in range(n_layers))
            attach_adapters(self.engine.anatomy.layers, self.adapters)
        self.num_visual_levels = n_vis
        # slots per level: K for token connectors, 1 per [CLS] (all_patch_tokens: N, known per call)
        self.num_visual_slots = 1 if config.connector == "linear" else self.connector.num_tokens
        pad = getattr(lm.config, "pad_token_id", None)
        self.placeholder_id = pad if isinstance(pad, int) else 0

    @staticmethod
    def _build_connector(config: EPALMConfig, encoder, d_enc: int, d: int, n_vis: int) -> nn.Module:
        k = config.num_visual_tokens
        if config.connector == "linear":
            return Connector(d_enc, d, n_vis, shared=config.shared_connector or config.all_patch_tokens)
        if config.connector == "qpmapper":
            return QueryMapper(d_enc, d, k, config.mapper_layers, config.mapper_heads, config.mapper_dim)
        if config.connector == "avgpool":
            return AvgPoolResampler(d_enc, d, k)
        n = config.encoder_tokens
        if n is None:
            if encoder is None:
                raise ValueError("connector='linear_resampler' without an encoder needs EPALMConfig.encoder_tokens "
                                 "(the token count of the cached features)")
            n = count_tokens(encoder, config.token_layers)
        return LinearResampler(d_enc, d, n, k)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: EPALMConfig, device: str | torch.device | None = None, *,
                    lm: nn.Module | None = None, encoder: nn.Module | None = None,
                    base_dir: str | os.PathLike | None = None) -> "EPALM":
        """Load the frozen encoder and LM named by ``config`` and build fresh trainable parts.

        Names (see :func:`resolve_name`): a hub id, a registry weight (``weights:<name>``, converted
        on first use) or a path (``./x`` / ``../x`` relative to ``base_dir``, the checkpoint).
        ``lm`` / ``encoder``: models already loaded, used instead of the ones the config names.
        """
        if lm is None:
            lm = load_lm(config, base_dir)
        if encoder is None:
            from epalm.core.encoders import load_encoder

            encoder = load_encoder(resolve_name(config.encoder, base_dir), num_layers=config.num_encoder_layers,
                                   **config.encoder_kwargs)
        model = cls(lm, encoder, config)
        return model.to(device) if device is not None else model

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None, *,
                        lm: nn.Module | None = None, encoder: nn.Module | None = None,
                        allow_code: bool = False, **config_overrides) -> "EPALM":
        """Rebuild the encoder + LM from the saved config and load the trainable weights.

        Like PEFT's ``PeftModel.from_pretrained(base, path)``, ``lm`` / ``encoder`` may be models
        already loaded; otherwise they are loaded from the names in ``epalm_config.json``
        (relative paths resolve against ``path``, so the folder can be moved or copied).
        ``allow_code=True`` honours ``trust_remote_code`` (and other code-loading keys) of the saved
        config; without it such a config is refused (see ``EPALMConfig.load``).
        """
        path = Path(path)
        config = EPALMConfig.load(path / CONFIG_NAME, allow_code=allow_code)
        if config_overrides:
            config = EPALMConfig.from_dict({**config.to_dict(), **config_overrides})
        model = cls.from_config(config, device=device, lm=lm, encoder=encoder, base_dir=path)
        model.load_trainable(path / WEIGHTS_NAME)
        return model

    # ------------------------------------------------------------------ state
    def train(self, mode: bool = True) -> "EPALM":
        """Only the trainable parts switch mode; the frozen LM and encoder stay in eval (no dropout)."""
        super().train(mode)
        self.lm.eval()
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def parameter_report(self) -> dict[str, float]:
        """Trainable vs total parameters (works on the meta device)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}

    def save_pretrained(self, path: str | os.PathLike, processor=None, save_base_models: bool = False,
                        encoder: nn.Module | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``epalm_config.json`` and the trainable weights (safetensors), each atomically.

        The config names the LM and encoder portably (:func:`portable_name`): hub ids and registry
        names as they are, local paths relative to ``path``, never an absolute path.
        ``processor`` (an :class:`epalm.data.processor.EPALMProcessor`; default ``self.processor``, which
        ``epalm train`` sets, so the Trainer's checkpoints carry it too) is saved alongside, so that
        inference preprocesses media exactly as training did. ``save_base_models=True`` also writes
        the frozen LM (``lm/``) and encoder (``encoder/``) into the folder (models that exist only
        in memory, e.g. the tiny random ones of ``epalm tiny-demo``); ``encoder``: the frozen
        encoder to save when this model runs on cached features (``self.encoder`` is None).
        ``state_dict``: the trainable weights to write instead of this model's own (the trainer's
        gathered copy when the model is FSDP-sharded).
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.config, lm_kwargs=dict(self.config.lm_kwargs),
                                     encoder_kwargs=dict(self.config.encoder_kwargs))
        if save_base_models:
            self.lm.save_pretrained(path / "lm")
            config.lm = "./lm"
            encoder = encoder if encoder is not None else self.encoder
            if encoder is not None:
                config.encoder = _save_encoder(encoder, path / "encoder")
        config.lm = portable_name(config.lm, path)
        config.encoder = portable_name(config.encoder, path)
        tensors = {k: v.contiguous().cpu() for k, v in (state_dict or self.trainable_state_dict()).items()}
        _atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=self._weights_metadata()))
        text = json.dumps(config.to_dict(), indent=2)
        _atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        processor = processor if processor is not None else getattr(self, "processor", None)
        if processor is not None:
            processor.save_pretrained(path)

    def _weights_metadata(self) -> dict[str, str]:
        """Stored with the weights: the LM depth and injected layers they were trained for."""
        return {"format": "pt", "lm_layers": str(len(self.engine.anatomy.layers)),
                "inject_start": str(self.inject_start), "inject_end": str(self.inject_end)}

    def load_trainable(self, source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
        """Load trainable weights; any missing, unexpected or mis-shaped tensor is an error naming it,
        and so are weights trained for an LM of another depth or other injected layers."""
        if isinstance(source, dict):
            tensors, where = source, "state dict"
        else:
            from safetensors import safe_open
            from safetensors.torch import load_file

            where = str(source)
            if not Path(source).is_file():
                raise FileNotFoundError(f"{where}: no such checkpoint file")
            try:
                tensors = load_file(where)
                with safe_open(where, framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception as err:  # safetensors raises several types for corrupt files
                raise ValueError(f"{where}: not a readable safetensors file ({err})") from err
            mine = self._weights_metadata()
            for key, what in (("lm_layers", "an LM with {} layers"), ("inject_start", "injection from layer {}"),
                              ("inject_end", "injection up to layer {}")):
                if key in meta and meta[key] != mine[key]:
                    raise ValueError(f"{where} was trained for {what.format(meta[key])}, but this model has "
                                     f"{what.format(mine[key])} (LM {self.config.lm!r}): wrong LM or config")
        own = dict(self.named_parameters())
        expected = {k for k, p in own.items() if p.requires_grad}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(
                f"{where} does not fit this model (variant {self.config.variant!r}): "
                f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected tensors {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ValueError(
                    f"{where}: tensor {name!r} has shape {tuple(tensor.shape)} but the model expects "
                    f"{tuple(own[name].shape)}"
                )
        with torch.no_grad():
            for name, tensor in tensors.items():
                own[name].copy_(tensor)

    def load_release_checkpoint(self, path: str | os.PathLike) -> None:
        """Load a checkpoint of the authors' release (``connector.i``, ``prompt_module.prefix_embedding.j``)."""
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state = blob.get("model", blob) if isinstance(blob, dict) else blob
        mapped = {}
        for name, tensor in state.items():
            name = name.removeprefix("module.")
            parts = name.split(".")
            if parts[0] == "connector":
                mapped[f"connector.linears.{parts[1]}.{parts[2]}"] = tensor
            elif name.startswith("prompt_module.prefix_embedding."):
                idx, leaf = parts[2], parts[3]
                target = {"0": "prompt.embedding", "1": "prompt.mlp.0", "3": "prompt.mlp.2"}[idx]
                mapped[f"{target}.{leaf}"] = tensor
        self.load_trainable(mapped)

    # ------------------------------------------------------------------ forward
    def visual_tokens(self, media: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Projected perceptual tokens ``(B, levels, slots, d)``.

        ``features``: encoder outputs computed earlier (feature cache), ``(B, k', d_enc)`` with
        ``k' >= levels`` (the last ``levels`` are used) or all patch tokens for MAGMA*.
        """
        if features is None:
            if media is None:
                raise ValueError("pass media (pixel_values / video / audio) or precomputed features")
            if self.encoder is None:
                raise ValueError("this model has no encoder (built with encoder=None): pass features=")
            layers = self.config.token_layers
            features = self.encoder(media, all_tokens=self.config.needs_all_tokens,
                                    **({"token_layers": layers} if layers != 1 else {}))
        if features.ndim != 3:
            raise ValueError(f"encoder features must be (batch, tokens, dim), got {tuple(features.shape)}")
        features = features.to(self._connector_dtype)
        if self.config.needs_all_tokens:
            # (B, 1, S, d): one level of S slots (all_patch_tokens: S = N; token connectors: S = K)
            return self.connector(features).unsqueeze(1)
        n = self.num_visual_levels
        if features.shape[1] < n:
            raise ValueError(f"features have {features.shape[1]} encoder layers but the model needs {n}")
        return self.connector(features[:, -n:]).unsqueeze(2)  # (B, n, 1, d)

    @property
    def _connector_dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def injection_state(self, media=None, features=None, batch_size: int | None = None) -> InjectionState:
        tokens = self.visual_tokens(media, features)
        b = tokens.shape[0]
        if batch_size is not None and batch_size != b:
            raise ValueError(f"media batch {b} != text batch {batch_size}")
        prompt = self.prompt(b) if self.prompt is not None else None
        deep = self.deep_prompt(b) if self.deep_prompt is not None else {}
        return InjectionState(tokens=tokens, prompt=prompt, deep_prompts=deep, mode=self.config.attention)

    def _prepare(self, media, features, input_ids, attention_mask):
        """Injection state plus ``[placeholder prefix | text]`` ids and 2-D mask."""
        if input_ids is None:
            raise ValueError("input_ids (the tokenized text) is required")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        state = self.injection_state(media, features, input_ids.shape[0])
        return (state, *self._with_prefix(state, input_ids, attention_mask))

    def _with_prefix(self, state: InjectionState, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        b, n = input_ids.shape[0], state.prefix_len
        ids = torch.cat([input_ids.new_full((b, n), self.placeholder_id), input_ids], dim=1)
        mask = torch.cat([attention_mask.new_ones((b, n)), attention_mask], dim=1)
        return ids, mask

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.engine.anatomy.lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        return_logits: bool = True,
        media: torch.Tensor | None = None,
        text_states: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        last_logits_only: bool = False,
    ) -> EPALMOutput:
        """Next-token loss on ``labels`` (HF convention: aligned with ``input_ids``, -100 ignored).

        ``return_logits=False`` skips the LM head except where the loss needs it (training).
        ``logits_to_keep=k`` (transformers' convention) returns the logits of the last ``k``
        columns only; ``last_logits_only=True`` those of each row's last attended token
        (``attention_mask``), ``(B, 1, V)``, so right-padded prompts decode without a loss or hook.
        ``text_states``: ``self.text_states(input_ids, attention_mask)`` computed earlier; the
        frozen layers below the first injected one are then skipped.
        """
        state, ids, mask = self._prepare(media if media is not None else pixel_values, features,
                                         input_ids, attention_mask)
        state.start_hidden = text_states
        with self.engine.active(state), self._only_upper_layers(text_states is not None):
            out = self.engine.anatomy.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state[:, state.prefix_len:]  # (B, T, d)
        logits = None
        if last_logits_only:
            text_mask = mask[:, state.prefix_len:]
            last = (text_mask.long().cumsum(1).argmax(1)).clamp(min=0)  # each row's last attended column
            logits = self.lm_logits(hidden[torch.arange(hidden.shape[0], device=hidden.device), last][:, None])
        elif logits_to_keep:
            logits = self.lm_logits(hidden[:, -int(logits_to_keep):].contiguous())
        elif return_logits:
            logits = self.lm_logits(hidden.contiguous())  # contiguous: faster head
        loss = loss_per_sample = num_label_tokens = None
        if labels is not None:
            target = labels[:, 1:]
            valid = target != -100  # (B, T-1)
            if logits is not None and logits.shape[1] == hidden.shape[1]:
                picked = logits[:, :-1][valid]
            else:
                picked = self.lm_logits(hidden[:, :-1][valid])  # head only where the loss needs it
            ce = F.cross_entropy(picked.float(), target[valid], reduction="none")
            rows = valid.nonzero()[:, 0]
            loss_per_sample = torch.zeros(ids.shape[0], device=ce.device, dtype=ce.dtype).index_add_(0, rows, ce)
            num_label_tokens = valid.sum(1)
            if self.config.loss_reduction == "official":
                loss = loss_per_sample.sum() / ids.shape[0] * 0.1
            else:
                loss = ce.sum() / valid.sum().clamp(min=1)
        return EPALMOutput(loss=loss, logits=logits, loss_per_sample=loss_per_sample,
                           num_label_tokens=num_label_tokens)

    # ------------------------------------------------------------------ reuse of the lower layers
    def _check_text_states_reusable(self) -> None:
        if self.prompt is not None or self.deep_prompt is not None or self.adapters is not None:
            raise ValueError(
                f"variant {self.config.variant!r} trains parameters below the first injected layer (soft "
                "prompt or adapters), so the lower layers' states change during training: text_states "
                "can only be reused by variants without them (lin, or epalm with prompt_len=0)")
        if self.config.all_patch_tokens:
            raise ValueError("text_states reuse needs a fixed number of slots; all_patch_tokens takes one per "
                             "encoder token")
        if self.engine.anatomy.layer_types is not None:
            raise ValueError("text_states reuse is not supported for LMs with per-layer attention types "
                             f"({type(self.lm).__name__}): their decoder indexes layers by position")

    @torch.no_grad()
    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the first injected layer, ``(B, L + T, d)``: it depends only on the text.

        The perceptual token is invisible below the first injected layer, so these states are the
        same for every image; compute them once per distinct question and pass them to ``forward``.
        """
        self._check_text_states_reusable()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        b = input_ids.shape[0]
        w = next(self.connector.parameters())
        d = self.engine.anatomy.hidden_size
        state = InjectionState(tokens=w.new_zeros(b, self.num_visual_levels, self.num_visual_slots, d), prompt=None,
                               mode=self.config.attention, capture=True)
        ids, mask = self._with_prefix(state, input_ids, attention_mask)
        try:
            with self.engine.active(state):
                self.engine.anatomy.decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        except StopForward:
            pass
        return state.captured

    @contextlib.contextmanager
    def _only_upper_layers(self, enabled: bool):
        """Temporarily hand the decoder only the layers from the first injected one on."""
        if not enabled:
            yield
            return
        self._check_text_states_reusable()
        anatomy = self.engine.anatomy
        setattr(anatomy.decoder, anatomy.layers_attr, nn.ModuleList(list(anatomy.layers)[self.inject_start:]))
        try:
            yield
        finally:
            setattr(anatomy.decoder, anatomy.layers_attr, anatomy.layers)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Open-ended answers through ``lm.generate`` (KV cache, greedy / beam / sampling).

        Prompts should be left-padded. Returns only the new tokens, ``(B * num_return_sequences, new)``.
        In ``official`` attention mode decoding is uncached by default, as in the release.
        """
        state, ids, mask = self._prepare(media if media is not None else pixel_values, features,
                                         input_ids, attention_mask)
        cfg = self.lm.generation_config
        if generate_kwargs.get("pad_token_id") is None and cfg.pad_token_id is None:
            generate_kwargs["pad_token_id"] = cfg.eos_token_id if cfg.eos_token_id is not None else 0
        if self.config.attention == "official":
            # The release decodes without a cache, and in its semantics the visual token attends to
            # every token so far (generated ones included): a KV cache would freeze its past rows.
            generate_kwargs.setdefault("use_cache", False)
        anatomy = self.engine.anatomy
        if anatomy.sliding_window and anatomy.layer_types and generate_kwargs.get("use_cache", True):
            # A sliding-window cache drops old keys, but our masks span the whole sequence:
            # give generate a full cache; the masks apply the window themselves.
            from transformers import DynamicCache

            key = "cache" if "cache" in inspect.signature(self.lm.forward).parameters else "past_key_values"
            generate_kwargs.setdefault(key, DynamicCache())
        with self.engine.active(state):
            out = self.lm.generate(input_ids=ids, attention_mask=mask, **generate_kwargs)
        return out[:, ids.shape[1]:]


# ---------------------------------------------------------------------- portable names
_NAME_PREFIXES = ("framewise:", "whisper-clip:")
_CACHED_REGISTRY = {  # folder in $EPALM_CACHE -> registry name (checkpoints written before registry names)
    "smollm2-135m-instruct": "weights:smollm2-135m-instruct",
    "gemma3-270m": "weights:gemma3-270m",
    "dinov2-small-imgfocus": "weights:dinov2-small",
    "whisper-base-ct2": "weights:whisper-base",
}


def _split_prefix(name: str) -> tuple[str, str]:
    for prefix in _NAME_PREFIXES:
        if name.startswith(prefix):
            inner_prefix, inner = _split_prefix(name[len(prefix):])
            return prefix + inner_prefix, inner
    return "", name


def resolve_name(name: str, base_dir: str | os.PathLike | None = None) -> str:
    """What loads a config name: ``./x`` / ``../x`` become ``base_dir/x``; other names are unchanged."""
    prefix, inner = _split_prefix(name)
    if inner.startswith(("./", "../")) and base_dir is not None:
        inner = str((Path(base_dir) / inner).resolve())
    return prefix + inner


def portable_name(name: str, checkpoint: str | os.PathLike) -> str:
    """The name ``epalm_config.json`` records: a hub id or registry name as it is, a converted
    registry weight's cache folder as its registry name, any other local path relative to ``checkpoint``."""
    prefix, inner = _split_prefix(name)
    if not Path(inner).is_absolute():
        return name
    from epalm.weights.cache import cache_dir

    target = Path(inner).resolve()
    try:
        target.relative_to(cache_dir().resolve())
        in_cache = True
    except ValueError:
        in_cache = False
    if in_cache:
        if target.name in _CACHED_REGISTRY:
            return prefix + _CACHED_REGISTRY[target.name]
        raise ValueError(f"{name}: a folder of the epalm cache is not portable; name the model by its hub id or "
                         f"registry name (weights:...), or save it with save_pretrained(..., save_base_models=True)")
    rel = os.path.relpath(target, Path(checkpoint).resolve())
    return prefix + (rel if rel.startswith("..") else f"./{rel}")


def load_lm(config: EPALMConfig, base_dir: str | os.PathLike | None = None) -> nn.Module:
    """The frozen causal LM a config names (hub id, ``weights:<name>`` or a path)."""
    from epalm.weights.registry import is_registry_name, load_registry_lm

    lm_kwargs = dict(config.lm_kwargs)
    for key in ("dtype", "torch_dtype"):
        if isinstance(lm_kwargs.get(key), str):
            lm_kwargs[key] = getattr(torch, lm_kwargs[key])
    if is_registry_name(config.lm):
        dtype = lm_kwargs.get("dtype", lm_kwargs.get("torch_dtype"))
        lm, _ = load_registry_lm(config.lm, **({"dtype": dtype} if dtype is not None else {}))
        lm.config._attn_implementation = lm_kwargs.get("attn_implementation", "sdpa")
        return lm
    from transformers import AutoModelForCausalLM

    lm_kwargs.setdefault("attn_implementation", "sdpa")
    name = resolve_name(config.lm, base_dir)
    check_model_path(name, "model.lm")
    return AutoModelForCausalLM.from_pretrained(name, **lm_kwargs)


def _save_encoder(encoder: nn.Module, folder: Path) -> str:
    """Save a frozen encoder's backbone (transformers models) and return the name that reloads it."""
    from epalm.core.encoders import FrameWiseEncoder, WhisperClipEncoder

    prefix = ""
    if isinstance(encoder, FrameWiseEncoder):
        prefix, encoder = "framewise:", encoder.image_encoder
    if isinstance(encoder, WhisperClipEncoder):
        prefix += "whisper-clip:"
    backbone = getattr(encoder, "model", None)
    if not hasattr(backbone, "save_pretrained"):
        raise ValueError(f"cannot save a {type(backbone).__name__} encoder backbone; name it by its hub id instead")
    backbone.save_pretrained(folder)
    return prefix + "./" + folder.name


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder then rename: a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
