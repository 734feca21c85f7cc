"""EPALMConfig: everything needed to rebuild a model, as data; and the paper's variants as presets."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epalm.errors import CodeLoadingRefused, ConfigError

def check_fields(obj: Any, where: str = "", ranges: dict[str, tuple[str, float]] | None = None,
                 choices: dict[str, tuple] | None = None) -> None:
    """Type- and range-check a config dataclass from its annotations; a ``ConfigError`` names the field.

    ``int`` fields take ints only (not ``"abc"``, not ``True``, not ``2.5``); ``float`` fields take
    any real number (stored as float); ``X | None`` also takes None; ``tuple[float, ...]`` takes a
    list. ``ranges``: ``{"lr": (">", 0), "epochs": (">=", 1)}``; ``choices``: allowed values.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        name = f"{where}.{f.name}" if where else f.name
        value = getattr(obj, f.name)
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        if optional:
            if value is None:
                continue
            inner = [a for a in args if a is not type(None)]
            hint = inner[0] if len(inner) == 1 else hint
        origin = typing.get_origin(hint) or hint
        value = _check_type(value, origin, typing.get_args(hint), name)
        setattr(obj, f.name, value)
        if ranges and f.name in ranges:
            op, bound = ranges[f.name]
            ok = value > bound if op == ">" else value >= bound if op == ">=" else value < bound
            if not ok:
                raise ConfigError(f"{name} must be {op} {bound}, got {value!r}")
        if choices and f.name in choices and value not in choices[f.name]:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices[f.name]))}, got {value!r}")


def _check_type(value: Any, kind: Any, args: tuple, name: str) -> Any:
    def bad(what: str):
        return ConfigError(f"{name} must be {what}, got {value!r}")

    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        value = float(value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind is str:
        if not isinstance(value, str):
            raise bad("a string")
    elif kind is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
    elif kind in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        elem = args[0] if args else None
        if elem is float and any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise bad("a list of numbers")
        if kind is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        value = (tuple if kind is tuple else list)(float(v) if elem is float else v for v in value)
    return value


# Each preset fills the fields the user left as None. Names follow the paper (Sec. 4, App. B).
VARIANTS: dict[str, dict[str, Any]] = {
    # eP-ALM family: [CLS] of the last 6 encoder layers injected into the LM's last layers.
    "lin": dict(shared_connector=True, prompt_len=0, adapters=False, inject="deep"),
    "pt": dict(shared_connector=True, prompt_len=10, prompt_mlp=True, adapters=False, inject="deep"),
    "epalm": dict(shared_connector=False, prompt_len=10, prompt_mlp=True, adapters=False, inject="deep"),
    "ada": dict(shared_connector=False, prompt_len=0, adapters=True, inject="deep"),
    "pt-L": dict(shared_connector=True, prompt_len=10, prompt_mlp=False, adapters=False, inject="deep"),
    "deep-pt": dict(shared_connector=False, prompt_len=10, prompt_mlp=False, deep_prompt=True,
                    adapters=False, inject="deep"),
    # Baselines re-implemented in the paper: the projected last [CLS] prepended at the LM input.
    "promptfuse": dict(shared_connector=True, num_encoder_layers=1, prompt_len=10, prompt_mlp=True,
                       adapters=False, inject="input"),
    "limber": dict(shared_connector=True, num_encoder_layers=1, prompt_len=0, adapters=False, inject="input"),
    "magma": dict(shared_connector=True, num_encoder_layers=1, prompt_len=0, adapters=True, inject="input"),
    "magma*": dict(shared_connector=True, num_encoder_layers=1, prompt_len=0, adapters=True, inject="input",
                   all_patch_tokens=True),
    # DePALM (Vallaeys et al. 2024): LiMBeR with every last-layer token (CLS + patches) projected
    # by one shared Linear at the input ("LiMBeR-all"); and token connectors over those tokens,
    # K tokens at the input ("L0") or inserted at the first injected layer and overwritten after.
    "limber-all": dict(shared_connector=True, num_encoder_layers=1, prompt_len=0, adapters=False, inject="input",
                       all_patch_tokens=True),
    "qp-l0": dict(connector="qpmapper", num_visual_tokens=32, num_encoder_layers=1, inject="input"),
    "qp-inner": dict(connector="qpmapper", num_visual_tokens=32, num_encoder_layers=1, inject="deep"),
    "avgpool-l0": dict(connector="avgpool", num_visual_tokens=49, num_encoder_layers=1, inject="input"),
    "avgpool-inner": dict(connector="avgpool", num_visual_tokens=49, num_encoder_layers=1, inject="deep"),
    "linres-l0": dict(connector="linear_resampler", num_visual_tokens=49, num_encoder_layers=1, inject="input"),
    "linres-inner": dict(connector="linear_resampler", num_visual_tokens=49, num_encoder_layers=1, inject="deep"),
}

CONNECTORS = ("linear", "qpmapper", "avgpool", "linear_resampler")

_PRESET_DEFAULTS: dict[str, Any] = dict(
    shared_connector=False, num_encoder_layers=6, prompt_len=0, prompt_mlp=True, deep_prompt=False,
    adapters=False, adapter_reduction=8, all_patch_tokens=False, inject="deep",
    connector="linear", mapper_layers=2, mapper_heads=8,
)


@dataclass
class EPALMConfig:
    """Rebuildable description of an eP-ALM model.

    ``lm`` / ``encoder``: Hugging Face ids or local paths (``encoder`` may be a timm name, or
    ``framewise:<image encoder>`` for video). ``variant`` picks a preset; any field set
    explicitly overrides it. ``inject_start``/``inject_end`` (end exclusive) default to the
    release's 19..31 of 32 layers, scaled to the LM's depth; ``inject="input"`` (baselines)
    prepends the token at the LM input only.

    ``connector``: ``"linear"`` (eP-ALM: a Linear per [CLS] token; ``all_patch_tokens`` projects
    every token instead), or a token connector reading all the encoder's tokens (of the last
    ``num_encoder_layers`` layers, concatenated, for the mapper and the linear resampler) and writing
    ``num_visual_tokens`` (K) slots: ``"qpmapper"`` (learned queries, ``mapper_layers`` blocks of
    ``mapper_heads`` heads, inner width ``mapper_dim`` = encoder width by default),
    ``"avgpool"`` or ``"linear_resampler"`` (which needs ``encoder_tokens``, the encoder's token
    count, when it cannot be counted from the encoder: cached features without an encoder).
    """

    lm: str = "facebook/opt-2.7b"
    encoder: str = "vit_base_patch16_224"
    variant: str = "epalm"
    attention: str = "causal"  # "causal" | "official"
    num_encoder_layers: int | None = None
    shared_connector: bool | None = None
    prompt_len: int | None = None
    prompt_mlp: bool | None = None
    deep_prompt: bool | None = None
    adapters: bool | None = None
    adapter_reduction: int | None = None
    all_patch_tokens: bool | None = None
    inject: str | None = None  # "deep" | "input"
    connector: str | None = None  # "linear" | "qpmapper" | "avgpool" | "linear_resampler"
    num_visual_tokens: int | None = None  # K, token connectors only
    mapper_layers: int | None = None
    mapper_heads: int | None = None
    mapper_dim: int | None = None
    encoder_tokens: int | None = None  # N for linear_resampler (counted from the encoder if None)
    inject_start: int | None = None
    inject_end: int | None = None
    text_step: int = 1
    loss_reduction: str = "mean"  # "mean" over labelled tokens | "official": sum per sample / B * 0.1
    lm_kwargs: dict = field(default_factory=dict)  # e.g. {"dtype": "bfloat16"}
    encoder_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self, ranges={"num_encoder_layers": (">=", 1), "prompt_len": (">=", 0),
                                   "adapter_reduction": (">=", 1), "inject_start": (">=", 0),
                                   "inject_end": (">=", 1), "text_step": (">=", 1)})
        for name in ("lm", "encoder"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{name} must name a hub id or a local folder, got {getattr(self, name)!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.attention not in ("causal", "official"):
            raise ConfigError(f"attention must be 'causal' or 'official', got {self.attention!r}")
        if self.loss_reduction not in ("mean", "official"):
            raise ConfigError(f"loss_reduction must be 'mean' or 'official', got {self.loss_reduction!r}")
        preset = {**_PRESET_DEFAULTS, **VARIANTS[self.variant]}
        for key, value in preset.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.inject not in ("deep", "input"):
            raise ConfigError(f"inject must be 'deep' or 'input', got {self.inject!r}")
        if self.num_encoder_layers < 1:
            raise ConfigError(f"num_encoder_layers must be >= 1, got {self.num_encoder_layers}")
        if self.connector not in CONNECTORS:
            raise ConfigError(f"connector must be one of {', '.join(CONNECTORS)}, got {self.connector!r}")
        if self.connector != "linear":
            if self.all_patch_tokens:
                raise ConfigError(f"all_patch_tokens is for connector='linear'; connector={self.connector!r} "
                                 "always reads all the encoder's tokens")
            for name in ("num_visual_tokens", "mapper_layers", "mapper_heads", "mapper_dim", "encoder_tokens"):
                value = getattr(self, name)
                if value is not None and (not isinstance(value, int) or value < 1):
                    raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            if self.num_visual_tokens is None:
                raise ConfigError(f"connector={self.connector!r} needs num_visual_tokens (K)")
            if self.connector == "avgpool" and self.num_encoder_layers != 1:
                raise ConfigError("connector='avgpool' pools the last layer's patch grid: num_encoder_layers must be 1, "
                                 f"got {self.num_encoder_layers}")

    @property
    def needs_all_tokens(self) -> bool:
        """Whether the model reads every encoder token (cache / ``features=`` shape (B, N, d_enc))."""
        return bool(self.all_patch_tokens) or self.connector != "linear"

    @property
    def token_layers(self) -> int:
        """How many last encoder layers' tokens a token connector reads (``num_encoder_layers``)."""
        return self.num_encoder_layers if self.connector in ("qpmapper", "linear_resampler") else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "EPALMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown EPALMConfig field(s) {unknown}; valid fields: {sorted(names)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from err

    @classmethod
    def load(cls, path: str | Path, allow_code: bool = False) -> "EPALMConfig":
        """Read a saved ``epalm_config.json``. Keys that make transformers import Python code from
        the model folder (``trust_remote_code``, ...) are refused unless ``allow_code=True``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the epalm config: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the epalm config must be a JSON object")
        config = cls.from_dict(data, source=str(path))
        check_code_loading(config, str(path), allow_code)
        return config


def check_model_path(name: str, what: str) -> None:
    """A name that can only be a local path (``/x``, ``./x``, ``~/x``, ``a/b/c``) must be a folder;
    otherwise transformers would report it as a malformed hub id."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what} must be a hub id or a local folder, got {name!r}")
    path_like = name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name
    if path_like and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"{what} {name!r}: no such directory (and not a hub id like 'owner/name')")


# keyword arguments of ``from_pretrained`` that make transformers import and run Python code
CODE_LOADING_KEYS = ("trust_remote_code", "code_revision")


def code_loading_keys(config: EPALMConfig) -> list[str]:
    """``["lm_kwargs.trust_remote_code", ...]``: the code-loading settings ``config`` asks for."""
    found = []
    for section in ("lm_kwargs", "encoder_kwargs"):
        kwargs = getattr(config, section)
        for key in CODE_LOADING_KEYS:
            if kwargs.get(key) not in (None, False):
                found.append(f"{section}.{key}")
        attn = kwargs.get("attn_implementation")
        if isinstance(attn, str) and "/" in attn:  # a hub kernel repository: downloaded code
            found.append(f"{section}.attn_implementation")
    return found


def check_code_loading(config: EPALMConfig, source: str, allow_code: bool = False) -> None:
    """Refuse a config read from a file that asks transformers to run code, unless ``allow_code``."""
    keys = code_loading_keys(config)
    if keys and not allow_code:
        raise CodeLoadingRefused(
            f"{source}: {', '.join(keys)} would let transformers import and run Python code shipped with "
            "the model; a saved config is not trusted with that. If you trust this model, pass it "
            "explicitly when loading: EPALM.from_pretrained(path, allow_code=True)")
