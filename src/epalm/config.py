"""EPALMConfig: everything needed to rebuild a model, as data; and the paper's variants as presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.attention not in ("causal", "official"):
            raise ValueError(f"attention must be 'causal' or 'official', got {self.attention!r}")
        if self.loss_reduction not in ("mean", "official"):
            raise ValueError(f"loss_reduction must be 'mean' or 'official', got {self.loss_reduction!r}")
        preset = {**_PRESET_DEFAULTS, **VARIANTS[self.variant]}
        for key, value in preset.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.inject not in ("deep", "input"):
            raise ValueError(f"inject must be 'deep' or 'input', got {self.inject!r}")
        if self.num_encoder_layers < 1:
            raise ValueError(f"num_encoder_layers must be >= 1, got {self.num_encoder_layers}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "EPALMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown EPALMConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "EPALMConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: cannot read the epalm config: {err}") from err
        return cls.from_dict(data, source=str(path))
