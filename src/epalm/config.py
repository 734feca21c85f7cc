"""EPALMConfig: everything needed to rebuild a model, as data; and the paper's variants as presets."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CodeLoadingRefused, ConfigError

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
}

_PRESET_DEFAULTS: dict[str, Any] = dict(
    shared_connector=False, num_encoder_layers=6, prompt_len=0, prompt_mlp=True, deep_prompt=False,
    adapters=False, adapter_reduction=8, all_patch_tokens=False, inject="deep",
)


@dataclass
class EPALMConfig:
    """Rebuildable description of an eP-ALM model.

    ``lm`` / ``encoder``: Hugging Face ids or local paths (``encoder`` may be a timm name, or
    ``framewise:<image encoder>`` for video). ``variant`` picks a preset; any field set
    explicitly overrides it. ``inject_start``/``inject_end`` (end exclusive) default to the
    release's 19..31 of 32 layers, scaled to the LM's depth; ``inject="input"`` (baselines)
    prepends the token at the LM input only.
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
