"""Perceptual-token injection into an *unmodified* Hugging Face causal LM, by hooks.

How it works (read top to bottom)
---------------------------------
The authors' release inserts the visual token at the first injected layer (sequence grows by
one there) and overwrites it at every later injected layer. Changing the sequence length in
the middle of a model breaks caches and masks, so we reserve the slot from the start instead:

    sequence = [slots (S) | soft prompt (P) | text (T)]      prefix length L = S + P

The caller puts placeholder token ids in the prefix. Hooks then:

1. on the layer stack's owner (the decoder), *before* it runs: compute our position ids and
   the two 4-D attention masks of this forward (slots hidden / slots visible);
2. on decoder layer ``i``, *before* it runs:
   - write the soft prompt into rows ``S..L`` at layer 0 (and deep prompts at their layers)
     - the prompt therefore gets no positional embedding, as in the release;
   - write the projected [CLS] token ``k(i)`` into the slot rows at every injected layer;
   - pass the mask for layer ``i``: below the first injected layer no query may see the slots
     (they do not exist yet in the release), from it on they are visible.

So text hidden states are exactly those of the release's "insert then overwrite" schedule, and
the KV cache, beam search and ``generate`` work unchanged. Prefix rows are only written when
the forward covers them (prefill); decoding steps only get masks and positions.

Attention semantics (``mode``):
- ``causal``: the slots are a causal prefix; a slot attends only to itself (and earlier
  slots); padding is never attended. Logits do not depend on padding.
- ``official``: the release's rule: the slot's query row is fully unmasked (it sees the prompt,
  future text tokens and padding). Kept to reproduce the paper's numbers and checkpoints.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from epalm.core.encoders import find_layer_stack

AttentionMode = Literal["causal", "official"]


# ---------------------------------------------------------------------------- schedule
def default_injection_range(num_layers: int) -> tuple[int, int]:
    """The release's layers 19..30 of 32 (``end`` exclusive), scaled to other depths."""
    start = round(19 * num_layers / 32)
    end = max(start + 1, round(31 * num_layers / 32))
    return start, end


def injection_schedule(start: int, end: int, num_tokens: int, text_step: int = 1) -> dict[int, int]:
    """``{lm_layer: encoder_token_index}`` exactly as the release computes it.

    ``step = (end-start)//n if end-start > n else 1``; layer ``idx`` in ``[start, end)`` with
    ``idx % text_step == 0`` gets token ``min((idx-start)//step, n-1)``.
    """
    span = end - start
    step = span // num_tokens if span > num_tokens and num_tokens > 1 else 1
    return {
        idx: min((idx - start) // step, num_tokens - 1)
        for idx in range(start, end)
        if idx % text_step == 0
    }


# ---------------------------------------------------------------------------- masks
def build_attention_mask(
    mask2d: torch.Tensor,
    query_len: int,
    num_slots: int,
    slots_visible: bool,
    mode: AttentionMode,
    dtype: torch.dtype,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Additive mask ``(B, 1, Q, K)`` for the last ``query_len`` positions of ``mask2d`` (B, K)."""
    batch, k_len = mask2d.shape
    device = mask2d.device
    q_pos = torch.arange(k_len - query_len, k_len, device=device)[:, None]  # (Q, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, K)
    allowed = (k_pos <= q_pos)[None] & mask2d[:, None, :].bool()  # (B, Q, K) causal + key padding
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)[None]
    slot_key = k_pos < num_slots
    slot_query = q_pos < num_slots
    if not slots_visible:
        # The slots do not exist yet: nobody sees them; a slot row sees only itself (finite output).
        allowed = (allowed & ~slot_key[None]) | ((k_pos == q_pos) & slot_query)[None]
    elif mode == "official":
        # Release: the visual token's query row is unmasked (future tokens and padding included).
        allowed = allowed | slot_query[None].expand_as(allowed)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


# ---------------------------------------------------------------------------- LM anatomy
@dataclass
class LMAnatomy:
    """Where things are inside a transformers causal LM, found without naming classes."""

    lm: nn.Module
    decoder: nn.Module  # owner of the layer stack (OPTDecoder, GPT2Model, LlamaModel, ...)
    layers: nn.ModuleList
    layers_attr: str  # attribute of ``decoder`` holding ``layers``
    hidden_size: int
    position_rule: Literal["text", "text_clamped", "consecutive"]
    layer_types: list[str] | None
    sliding_window: int | None
    attn_implementation: str = "sdpa"

    @classmethod
    def of(cls, lm: nn.Module) -> "LMAnatomy":
        cfg = lm.config
        cfg = getattr(cfg, "text_config", None) or cfg
        num_layers = getattr(cfg, "num_hidden_layers", None)
        try:
            name, layers = find_layer_stack(lm, num_layers)
        except ValueError as err:
            raise ValueError(
                f"cannot find the decoder layer stack of {type(lm).__name__} "
                f"(looked for an nn.ModuleList of {num_layers} identical blocks): {err}"
            ) from None
        owner_name = name.rsplit(".", 1)[0] if "." in name else ""
        decoder = lm.get_submodule(owner_name)
        impl = getattr(cfg, "_attn_implementation", None) or getattr(lm.config, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa"):
            raise ValueError(
                f"epalm needs attn_implementation 'sdpa' or 'eager' (it passes per-layer 4-D masks); "
                f"the LM uses {impl!r}. Load it with attn_implementation='sdpa'."
            )
        model_type = getattr(cfg, "model_type", "")
        if model_type == "opt":
            rule = "text"  # release: text positions from the text mask, pads -> -1 (row 1)
        elif model_type in ("gpt2", "gpt_neo", "gpt_bigcode", "biogpt", "xglm"):
            rule = "text_clamped"  # learned absolute positions: text from 0
        else:
            rule = "consecutive"  # rotary: the prefix takes positions 0..L-1, text follows
        layer_types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
        return cls(lm, decoder, layers, name.rsplit(".", 1)[-1], hidden, rule,
                   list(layer_types) if layer_types else None, window, impl or "sdpa")

    def is_sliding(self, layer_idx: int) -> bool:
        return bool(self.layer_types and self.sliding_window and self.layer_types[layer_idx] == "sliding_attention")


def position_ids_for(mask2d: torch.Tensor, prefix_len: int, rule: str) -> torch.Tensor:
    """Position ids ``(B, K)`` for ``[prefix | text]`` under ``rule`` (see LMAnatomy)."""
    if rule == "consecutive":
        return (mask2d.long().cumsum(-1) - 1).clamp_(min=0)
    text_mask = mask2d[:, prefix_len:].long()
    text_pos = text_mask.cumsum(-1) * text_mask - 1
    if rule == "text_clamped":
        text_pos = text_pos.clamp(min=0)
    prefix_pos = torch.zeros_like(mask2d[:, :prefix_len], dtype=torch.long)
    return torch.cat([prefix_pos, text_pos], dim=1)


class StopForward(Exception):
    """Raised by the hook at the first injected layer when only its input was wanted."""


# ---------------------------------------------------------------------------- per-call state
@dataclass
class InjectionState:
    """What one EPALM forward / generate call injects. Tensors have the *un-expanded* batch."""

    tokens: torch.Tensor | None  # (B, n_levels, S, d): level k's S slot tokens
    prompt: torch.Tensor | None  # (B, P, d) written at layer 0
    deep_prompts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, P, d)
    mode: AttentionMode = "causal"
    # reuse of the media-independent layers below the first injected one (see EPALM.text_states)
    start_hidden: torch.Tensor | None = None  # given: the input of the first injected layer
    capture: bool = False  # capture that input and stop the forward there
    captured: torch.Tensor | None = None
    # filled per forward by the decoder pre-hook
    _masks: dict = field(default_factory=dict)
    _past: int = 0
    _query_len: int = 0
    _expanded: dict = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[2]

    @property
    def prompt_len(self) -> int:
        if self.prompt is not None:
            return self.prompt.shape[1]
        return next(iter(self.deep_prompts.values())).shape[1] if self.deep_prompts else 0

    @property
    def prefix_len(self) -> int:
        return self.num_slots + self.prompt_len

    def expand(self, name: str, t: torch.Tensor, batch: int) -> torch.Tensor:
        """Repeat per-sample tensors for beam search / multiple return sequences."""
        if t.shape[0] == batch:
            return t
        key = (name, batch)
        if key not in self._expanded:
            if batch % t.shape[0]:
                raise RuntimeError(f"batch {batch} is not a multiple of the injected batch {t.shape[0]}")
            self._expanded[key] = t.repeat_interleave(batch // t.shape[0], dim=0)
        return self._expanded[key]


class _CallArgs:
    """Read / replace named arguments of a hooked call while keeping its positional/keyword shape.

    (Decorated transformers forwards re-inspect their arguments, so a call is never reshaped.)
    """

    def __init__(self, names: list[str], args: tuple, kwargs: dict) -> None:
        self.index = {name: i for i, name in enumerate(names)}
        self.args, self.kwargs = list(args), kwargs

    def get(self, name: str):
        i = self.index.get(name)
        if i is not None and i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name)

    def set(self, name: str, value) -> None:
        i = self.index.get(name)
        if i is not None and i < len(self.args):
            self.args[i] = value
        else:
            self.kwargs[name] = value

    def result(self) -> tuple[tuple, dict]:
        return tuple(self.args), self.kwargs


def _param_names(fn) -> list[str]:
    return [
        name for name, p in inspect.signature(fn).parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


class InjectionEngine:
    """Registers the hooks once; they act only while ``engine.active(state)`` is entered."""

    def __init__(self, anatomy: LMAnatomy, schedule: dict[int, int], inject_start: int) -> None:
        self.anatomy = anatomy
        n = len(self.anatomy.layers)
        for layer in schedule:
            if not 0 <= layer < n:
                raise ValueError(f"injection layer {layer} is out of range: the LM has {n} layers (0..{n - 1})")
        self.schedule = schedule
        self.inject_start = inject_start
        self.state: InjectionState | None = None
        self._decoder_params = _param_names(self.anatomy.decoder.forward)
        self._layer_params = _param_names(self.anatomy.layers[0].forward)
        if "attention_mask" not in inspect.signature(self.anatomy.layers[0].forward).parameters:
            raise ValueError(f"{type(self.anatomy.layers[0]).__name__}.forward takes no attention_mask")
        self._handles = [self.anatomy.decoder.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True)]
        for idx, layer in enumerate(self.anatomy.layers):
            self._handles.append(layer.register_forward_pre_hook(_LayerHook(self, idx), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    # context manager ---------------------------------------------------------------
    class _Active:
        def __init__(self, engine: "InjectionEngine", state: InjectionState) -> None:
            self.engine, self.new = engine, state

        def __enter__(self) -> InjectionState:
            self.old, self.engine.state = self.engine.state, self.new
            return self.new

        def __exit__(self, *exc: object) -> None:
            self.engine.state = self.old

    def active(self, state: InjectionState) -> "InjectionEngine._Active":
        return self._Active(self, state)

    def checkpoint_contexts(self):
        """``context_fn`` of ``torch.utils.checkpoint``: the recomputation of a layer in the backward
        pass runs inside the injection state that was active when the layer ran forward."""
        state = self.state
        return contextlib.nullcontext(), (self.active(state) if state is not None else contextlib.nullcontext())

    # hooks ---------------------------------------------------------------------------
    def _decoder_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        state = self.state
        if state is None:
            return None
        call = _CallArgs(self._decoder_params, args, kwargs)
        mask2d = call.get("attention_mask")
        ref = call.get("input_ids") if call.get("input_ids") is not None else call.get("inputs_embeds")
        if ref is None:
            raise RuntimeError("epalm: the decoder was called without input_ids or inputs_embeds")
        query_len = ref.shape[1]
        if mask2d is None:  # transformers 5 drops an all-ones mask in generate: rebuild it
            cache = call.get("cache") if "cache" in self._decoder_params else call.get("past_key_values")
            seen = cache.get_seq_length() if cache is not None else 0
            mask2d = torch.ones(ref.shape[0], seen + query_len, dtype=torch.long, device=ref.device)
        if mask2d.ndim != 2:
            raise RuntimeError("epalm: the decoder must be called with a 2-D attention_mask (got a "
                               f"{mask2d.ndim}-D one); do not use a static/compiled cache")
        past = mask2d.shape[1] - query_len
        if 0 < past < state.prefix_len:
            raise RuntimeError(f"epalm: cached prefix is incomplete ({past} < {state.prefix_len} tokens)")
        state._past, state._query_len, state._masks = past, query_len, {}
        state._unpadded = bool(mask2d.all())
        state._mask2d = mask2d
        positions = position_ids_for(mask2d, state.prefix_len, self.anatomy.position_rule)
        call.set("position_ids", positions[:, past:])
        return call.result()

    def _mask(self, state: InjectionState, layer_idx: int, dtype: torch.dtype) -> torch.Tensor | None:
        visible = layer_idx >= self.inject_start
        sliding = self.anatomy.is_sliding(layer_idx)
        if (visible and not sliding and state.mode == "causal" and state._unpadded
                and self.anatomy.attn_implementation == "sdpa" and (state._past == 0 or state._query_len == 1)):
            # Exactly the plain causal mask: let SDPA use its causal kernels (flash / efficient on GPU).
            return None
        key = (visible, sliding, dtype)
        if key not in state._masks:
            state._masks[key] = build_attention_mask(
                state._mask2d, state._query_len, state.num_slots, visible, state.mode, dtype,
                self.anatomy.sliding_window if sliding else None,
            )
        return state._masks[key]

    def _layer_hook(self, idx: int, module: nn.Module, args: tuple, kwargs: dict):
        state = self.state
        if state is None:
            return None
        level = self.schedule.get(idx)
        call = _CallArgs(self._layer_params, args, kwargs)
        hidden = call.get("hidden_states")
        batch = hidden.shape[0]
        if state._past == 0 and idx == self.inject_start:
            if state.capture:
                state.captured = hidden.detach()
                raise StopForward
            if state.start_hidden is not None:
                hidden = state.expand("start_hidden", state.start_hidden, batch).to(hidden.dtype)
                call.set("hidden_states", hidden)
        if state._past == 0:
            s, p = state.num_slots, state.prompt_len
            pieces = None
            prompt = state.prompt if idx == 0 else None
            prompt = state.deep_prompts.get(idx, prompt)
            if prompt is not None:
                prompt = state.expand(f"prompt{idx}", prompt, batch).to(hidden.dtype)
                pieces = [hidden[:, :s], prompt, hidden[:, s + p:]]
            if level is not None and s:
                slot = state.expand(f"tok{level}", state.tokens[:, level], batch).to(hidden.dtype)
                pieces = [slot] + (pieces[1:] if pieces else [hidden[:, s:]])
            if pieces is not None:
                call.set("hidden_states", torch.cat(pieces, dim=1))
        call.set("attention_mask", self._mask(state, idx, hidden.dtype))
        return call.result()


class _LayerHook:
    """A picklable/deep-copyable hook (a closure would keep pointing at the original engine)."""

    def __init__(self, engine: InjectionEngine, idx: int) -> None:
        self.engine, self.idx = engine, idx

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        return self.engine._layer_hook(self.idx, module, args, kwargs)


# ---------------------------------------------------------------------------- adapters
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "fc2")


def _find_child(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(f"cannot find the {what} of {type(layer).__name__} (looked for {', '.join(names)})")


class _AdapterHook:
    """Forward hook adding an adapter to a sub-layer's output (deep-copies with its model)."""

    def __init__(self, adapter: nn.Module) -> None:
        self.adapter = adapter

    def __call__(self, _module: nn.Module, _args: tuple, output):
        if isinstance(output, tuple):
            return (self.adapter(output[0]),) + output[1:]
        return self.adapter(output)


def attach_adapters(layers: nn.ModuleList, adapters: nn.ModuleList) -> list:
    """Run ``adapters[i].attn`` after layer i's self-attention and ``.ffn`` after its FFN (forward hooks)."""
    handles = []
    for layer, adapter in zip(layers, adapters):
        handles.append(_find_child(layer, _ATTN_NAMES, "self-attention").register_forward_hook(_AdapterHook(adapter.attn)))
        handles.append(_find_child(layer, _FFN_NAMES, "feed-forward block").register_forward_hook(_AdapterHook(adapter.ffn)))
    return handles
