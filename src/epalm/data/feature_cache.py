"""Precomputed encoder features on disk: compute a frozen encoder's [CLS] tokens once, train many times.

The encoder is frozen, so ``encoder(media)`` -- the per-layer summary tokens ``(k, d)`` of each
image / video / clip -- never changes during training. A :class:`FeatureCache` stores them in a
directory::

    cache/
      features.npy   (N, k, d) float16/float32, opened with np.load(mmap_mode="r")
      index.json     {"<media id>": row, ...}
      meta.json      fingerprint (encoder, weights hash, k, preprocessing, ...), dtype,
                     epalm version, row count and ``"complete": true``

A cache is only ever used when it is complete and was built by the same encoder weights with the
same preprocessing: :meth:`FeatureCache.open` raises :class:`StaleCacheError` (naming the fields
that differ) or :class:`IncompleteCacheError` (missing ``complete`` flag, truncated file, index
that disagrees with the rows) instead of silently feeding wrong features to training.

:meth:`FeatureCache.build` writes into ``<path>.partial`` beside the target and renames it into
place only when every row is written, so ``path`` exists only as a complete cache. The partial
directory records its progress after every batch (rows fsynced first, then an atomic marker);
``build(..., resume=True)`` (the default) continues an interrupted build from the last marker.

Usage::

    fp = encoder_fingerprint(encoder, "google/vit-base-patch16-224",
                             {"image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3})
    FeatureCache.build("feats/coco_train", encoder, ((img_id, loader) for ...), fp, device="cuda")
    cache = FeatureCache.open("feats/coco_train", fp)
    out = model(features=cache.get_batch(batch_ids), input_ids=..., labels=...)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from epalm.errors import MediaError
from epalm.io import atomic_write_json

__all__ = [
    "CacheError",
    "FeatureCache",
    "IncompleteCacheError",
    "StaleCacheError",
    "encoder_fingerprint",
    "weights_digest",
]

#: On-disk layout version; a cache written with another version is refused.
FORMAT_VERSION = 1
#: Bump when the meaning of the extracted features changes (pooling, norm placement, ...), so
#: caches built by an older epalm are reported stale instead of silently reused.
EXTRACTION_VERSION = 1

FEATURES_NAME = "features.npy"
INDEX_NAME = "index.json"
META_NAME = "meta.json"
_PROGRESS_NAME = "progress.json"  # only in <path>.partial
_IDS_NAME = "ids.jsonl"  # only in <path>.partial: one JSON string per row, appended
_HEADER_BYTES = 256  # fixed-size .npy header, so rows can be appended before N is known
_DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}

MediaId = str | int
ItemSource = torch.Tensor | np.ndarray | Callable[[], Any]


class CacheError(RuntimeError):
    """A feature cache cannot be used; the message names the cache directory."""


class StaleCacheError(CacheError):
    """The cache was built with a different encoder / preprocessing; ``fields`` lists what differs."""

    def __init__(self, message: str, fields: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.fields = list(fields)

    def __reduce__(self):
        return (type(self), (str(self), self.fields))


class IncompleteCacheError(CacheError):
    """The cache is partial or damaged (no ``complete`` flag, truncated features, bad index)."""


# ---------------------------------------------------------------------------------------- fingerprint
def _epalm_version() -> str:
    from epalm import __version__

    return __version__


def weights_digest(module: nn.Module, sample: int = 2048) -> tuple[str, int]:
    """A cheap hash of ``module``'s weights: ``(hex digest, number of parameters)``.

    Covers every tensor of the state dict: its name, shape, dtype, and the bytes of up to
    ``sample`` evenly strided elements (all elements for small tensors). Any fine-tuning or
    different checkpoint changes it; a single edited element of a large tensor may not.
    Deterministic across devices (bytes are hashed, not floating-point reductions).
    """
    h = hashlib.blake2b(digest_size=16)
    count = 0
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        t = tensor.detach()
        key = id(tensor)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if key in seen:  # shared/aliased module (e.g. the final norm also reachable from the wrapper)
            continue
        seen.add(key)
        if isinstance(tensor, nn.Parameter):
            count += t.numel()
        flat = t.reshape(-1)
        if flat.numel() > sample:
            step = math.ceil(flat.numel() / sample)
            flat = flat[::step]
        flat = flat.contiguous().cpu()
        if flat.numel():
            if flat.dtype.is_complex:
                flat = torch.view_as_real(flat).reshape(-1)
            h.update(flat.view(torch.uint8).numpy().tobytes())
    h.update(f"params={count}".encode())
    return h.hexdigest(), count


def encoder_fingerprint(encoder: nn.Module, name: str, preprocessing: dict[str, Any],
                        all_tokens: bool = False, token_layers: int = 1) -> dict[str, Any]:
    """Everything that determines a cached feature: encoder identity + weights, k, preprocessing.

    Args:
        encoder: the wrapped encoder (``epalm.core.encoders.Encoder`` / ``FrameWiseEncoder``).
        name: the encoder's name or hub id (``"google/vit-base-patch16-224"``).
        preprocessing: how media become encoder input (image size, mean/std, frames, sample
            rate, ...); any JSON-serialisable dict. Changing any entry makes old caches stale.
        all_tokens: cache every last-layer token (MAGMA*) instead of per-layer [CLS] tokens.
        token_layers: with ``all_tokens``, cache the tokens of the last ``token_layers`` layers
            (concatenated on the token axis); recorded in the fingerprint only when > 1.
    """
    if not isinstance(preprocessing, dict):
        raise TypeError(f"preprocessing must be a dict describing the media transform, got {type(preprocessing).__name__}")
    digest, count = weights_digest(encoder)
    inner = getattr(encoder, "image_encoder", encoder)  # FrameWiseEncoder wraps an Encoder
    backbone = getattr(inner, "model", inner)
    fp = {
        "encoder": str(name),
        "encoder_class": f"{type(encoder).__name__}({type(backbone).__name__})",
        "weights": digest,
        "num_parameters": count,
        "num_layers": getattr(encoder, "num_layers", None),
        "hidden_size": getattr(encoder, "hidden_size", None),
        "pooling": getattr(inner, "pooling", None),
        "all_tokens": bool(all_tokens),
        "preprocessing": preprocessing,
        "extraction_version": EXTRACTION_VERSION,
    }
    if all_tokens and token_layers != 1:
        fp["token_layers"] = int(token_layers)
    return _normalize(fp)


def _normalize(obj: Any) -> Any:
    """JSON round trip (tuples -> lists, numpy scalars -> numbers) so stored and expected compare equal."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))
    except (TypeError, ValueError) as err:
        raise TypeError(f"the cache fingerprint must be JSON-serialisable: {err}") from err


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (torch.dtype, np.dtype, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() <= 64:
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and (d or not prefix):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def fingerprint_diff(cached: dict[str, Any], expected: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(dotted field, cached value, expected value), ...]`` for every differing leaf."""
    a, b = _flatten(_normalize(cached)), _flatten(_normalize(expected))
    missing = object()
    diff = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            diff.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
    return diff


# ---------------------------------------------------------------------------------------- helpers
def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """Types of the meta.json fields the reader relies on (a tampered file is named, not a traceback)."""
    checks = {"rows": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
              "shape": lambda v: isinstance(v, list) and all(isinstance(x, int) and x > 0 for x in v),
              "dtype": lambda v: v in ("float16", "float32")}
    for key, ok in checks.items():
        if key in meta and not ok(meta[key]):
            raise IncompleteCacheError(f"{path}: meta.json field {key!r} is malformed ({meta[key]!r}); rebuild the cache")
        if key not in meta:
            raise IncompleteCacheError(f"{path}: meta.json has no {key!r} field; rebuild the cache")


def _media_key(media_id: Any) -> str:
    if isinstance(media_id, str):
        return media_id
    if isinstance(media_id, (int, np.integer)) and not isinstance(media_id, bool):
        return str(int(media_id))
    if isinstance(media_id, os.PathLike):
        return os.fspath(media_id)
    raise TypeError(f"media ids must be str or int, got {type(media_id).__name__} ({media_id!r})")


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"unsupported cache dtype {dtype!r}; use float16 or float32") from err
    if dt.name not in _DTYPES:
        raise ValueError(f"unsupported cache dtype {dt.name!r}; use float16 or float32")
    return dt


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A valid .npy v1.0 header padded to exactly ``_HEADER_BYTES`` (a multiple of 64)."""
    body = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    size = _HEADER_BYTES - 10
    if len(body) + 1 > size:
        raise ValueError(f"shape {shape} too large for the cache header")
    text = body.ljust(size - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", size) + text.encode("latin1")


def _read_json(path: Path, what: str, error: type[Exception]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise error(f"{path.parent}: {what} ({path.name}) is missing") from err
    except (OSError, ValueError) as err:
        raise error(f"{path.parent}: {what} ({path.name}) is unreadable: {err}") from err


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _load_item(media_id: str, source: Any) -> torch.Tensor:
    value = source() if callable(source) and not isinstance(source, (torch.Tensor, np.ndarray)) else source
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"media {media_id!r}: expected a tensor (or a loader returning one), got {type(value).__name__}")
    return value


def partial_path(path: str | os.PathLike) -> Path:
    """Where :meth:`FeatureCache.build` keeps an unfinished build of ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


# ---------------------------------------------------------------------------------------- cache
class FeatureCache:
    """Read-only, memory-mapped per-media encoder features; use :meth:`open` or :meth:`build`.

    ``cache[media_id]`` -> ``(k, d)`` tensor, ``cache.get_batch(ids)`` -> ``(B, k, d)`` (pass it as
    ``EPALM(features=...)``), ``len(cache)``, ``media_id in cache``. Picklable (DataLoader
    workers re-open the memory map lazily).
    """

    def __init__(self, path: Path, meta: dict[str, Any], index: dict[str, int]) -> None:
        self.path = path
        self.meta = meta
        self._index = index
        self._array: np.ndarray | None = None

    # ------------------------------------------------------------------ open
    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict[str, Any]:
        """The cache's ``meta.json`` without any validation (for inspection)."""
        return _read_json(Path(path) / META_NAME, "metadata", IncompleteCacheError)

    @classmethod
    def open(cls, path: str | os.PathLike, expected_fingerprint: dict[str, Any]) -> "FeatureCache":
        """Open a complete cache built with ``expected_fingerprint`` (see :func:`encoder_fingerprint`).

        Raises:
            FileNotFoundError: no cache at ``path``.
            IncompleteCacheError: unfinished or damaged cache.
            StaleCacheError: built with another encoder / weights / k / preprocessing.
        """
        path = Path(path)
        if not path.is_dir():
            hint = ""
            if partial_path(path).exists():
                hint = f" (an unfinished build is at {partial_path(path)}; rerun FeatureCache.build(..., resume=True))"
            raise FileNotFoundError(f"{path}: no feature cache here{hint}")
        meta = _read_json(path / META_NAME, "metadata", IncompleteCacheError)
        if not isinstance(meta, dict) or meta.get("complete") is not True:
            raise IncompleteCacheError(f"{path}: cache is incomplete (meta.json has no \"complete\": true); rebuild it")
        if meta.get("format") != FORMAT_VERSION:
            raise StaleCacheError(
                f"{path}: cache format {meta.get('format')!r}, this epalm reads format {FORMAT_VERSION}; rebuild it",
                ["format"],
            )
        if not isinstance(expected_fingerprint, dict):
            raise TypeError("expected_fingerprint must be a dict (see epalm.data.feature_cache.encoder_fingerprint)")
        diff = fingerprint_diff(meta.get("fingerprint", {}), expected_fingerprint)
        if diff:
            lines = "; ".join(f"{k}: cached={_short(a)} expected={_short(b)}" for k, a, b in diff)
            raise StaleCacheError(
                f"{path}: stale feature cache, built with a different encoder or preprocessing "
                f"(differs in {', '.join(k for k, _, _ in diff)}): {lines}. Rebuild it.",
                [k for k, _, _ in diff],
            )
        _check_meta(path, meta)
        index = _read_json(path / INDEX_NAME, "index", IncompleteCacheError)
        rows = meta.get("rows")
        if not isinstance(index, dict) or not isinstance(rows, int):
            raise IncompleteCacheError(f"{path}: index.json or meta.json rows is malformed")
        if len(index) != rows:
            raise IncompleteCacheError(f"{path}: index.json has {len(index)} ids but meta.json says {rows} rows")
        if sorted(index.values()) != list(range(rows)):
            raise IncompleteCacheError(f"{path}: index.json rows are not exactly 0..{rows - 1}")
        cache = cls(path, meta, index)
        cache._check_features()
        return cache

    def _check_features(self) -> None:
        file = self.path / FEATURES_NAME
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                offset = f.tell()
        except FileNotFoundError as err:
            raise IncompleteCacheError(f"{self.path}: {FEATURES_NAME} is missing") from err
        except (OSError, ValueError) as err:
            raise IncompleteCacheError(f"{self.path}: {FEATURES_NAME} has no valid .npy header: {err}") from err
        meta = self.meta
        want = (meta["rows"], *meta.get("shape", []))
        if tuple(shape) != tuple(want) or fortran or dtype.name != meta.get("dtype"):
            raise IncompleteCacheError(
                f"{self.path}: {FEATURES_NAME} is {dtype.name}{tuple(shape)} but meta.json says "
                f"{meta.get('dtype')}{tuple(want)}"
            )
        expected_size = offset + int(np.prod(shape)) * dtype.itemsize
        actual = file.stat().st_size
        if actual != expected_size:
            raise IncompleteCacheError(
                f"{self.path}: {FEATURES_NAME} is {actual} bytes, expected {expected_size} "
                f"for {shape[0]} rows (truncated or damaged); rebuild the cache"
            )

    # ------------------------------------------------------------------ access
    @property
    def array(self) -> np.ndarray:
        """The read-only memory map ``(N, k, d)``."""
        if self._array is None:
            self._array = np.load(self.path / FEATURES_NAME, mmap_mode="r")
        return self._array

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.meta["fingerprint"]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    @property
    def shape(self) -> tuple[int, ...]:
        """``(k, d)`` of one entry."""
        return tuple(self.meta["shape"])

    @property
    def ids(self) -> list[str]:
        """Media ids in row order."""
        return sorted(self._index, key=self._index.__getitem__)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, media_id: object) -> bool:
        try:
            return _media_key(media_id) in self._index
        except TypeError:
            return False

    def __iter__(self):
        return iter(self.ids)

    def row(self, media_id: MediaId) -> int:
        key = _media_key(media_id)
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"media id {key!r} is not in the feature cache {self.path} ({len(self)} entries)") from None

    def __getitem__(self, media_id: MediaId) -> torch.Tensor:
        out = torch.from_numpy(np.array(self.array[self.row(media_id)]))
        self._check_finite(out, [media_id])
        return out

    def _check_finite(self, features: torch.Tensor, media_ids: list) -> None:
        """Damaged cached values would surface as a NaN loss ("lower the lr"): name the cache instead."""
        if not bool(torch.isfinite(features).all()):
            bad = [m for m, f in zip(media_ids, features.reshape(len(media_ids), -1)) if not torch.isfinite(f).all()]
            raise MediaError(bad[0] if len(bad) == 1 else ", ".join(map(str, bad[:5])),
                             f"non-finite values in cached features {self.path}; rebuild the cache")

    def get_batch(self, media_ids: Iterable[MediaId], device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
        """Features of ``media_ids`` stacked in order, ``(B, k, d)`` (stored dtype unless ``dtype``)."""
        media_ids = list(media_ids)
        rows = [self.row(m) for m in media_ids]
        out = torch.from_numpy(np.ascontiguousarray(self.array[rows]))
        if rows:
            self._check_finite(out, media_ids)
        if device is not None or dtype is not None:
            out = out.to(device=device, dtype=dtype)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None  # re-mapped lazily in the receiving process
        return state

    def __repr__(self) -> str:
        fp = self.meta.get("fingerprint", {})
        return (f"FeatureCache({str(self.path)!r}, rows={len(self)}, shape={self.shape}, dtype={self.meta['dtype']}, "
                f"encoder={fp.get('encoder')!r})")

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        path: str | os.PathLike,
        encoder: nn.Module,
        items: Iterable[tuple[MediaId, ItemSource]],
        fingerprint: dict[str, Any],
        batch_size: int = 64,
        device: str | torch.device | None = None,
        dtype: Any = "float16",
        progress: bool = True,
        resume: bool = True,
        autocast: bool = False,
        overwrite: bool = False,
        all_tokens: bool | None = None,
    ) -> "FeatureCache":
        """Run ``encoder`` over ``items`` and write a complete cache at ``path``; return it opened.

        Args:
            items: ``(media_id, source)`` pairs; ``source`` is one media tensor without batch dim
                (e.g. ``(3, H, W)``) or a zero-argument callable returning one (loaded lazily, and
                never called for ids already computed). Repeated ids are computed once.
            fingerprint: from :func:`encoder_fingerprint` (its weights hash is checked against
                ``encoder``).
            device: where to run; the encoder is moved there (``encoder.to(device)``). Default:
                the encoder's device.
            dtype: storage dtype, ``"float16"`` (default) or ``"float32"`` (bit-exact).
            resume: continue an interrupted build found at ``<path>.partial`` (it must have the
                same fingerprint and dtype); ``False`` discards it and starts over.
            autocast: run the encoder under bf16 autocast (CUDA only; ignored elsewhere).
            overwrite: replace an existing cache at ``path`` (otherwise FileExistsError).
        """
        path = Path(path)
        np_dtype = _np_dtype(dtype)
        fingerprint = _normalize(fingerprint)
        if not isinstance(fingerprint, dict):
            raise TypeError("fingerprint must be a dict (see epalm.data.feature_cache.encoder_fingerprint)")
        fp_tokens = fingerprint.get("all_tokens")
        if all_tokens is None:
            all_tokens = bool(fp_tokens)
        elif fp_tokens is not None and bool(fp_tokens) != bool(all_tokens):
            raise ValueError(f"all_tokens={all_tokens} but the fingerprint says all_tokens={fp_tokens}")
        if "weights" in fingerprint:
            digest, _ = weights_digest(encoder)
            if digest != fingerprint["weights"]:
                raise ValueError("the fingerprint's weights hash does not match this encoder; "
                                 "compute it with encoder_fingerprint(encoder, ...) for the encoder you run")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: a feature cache already exists; open it with FeatureCache.open "
                                  "or pass overwrite=True to rebuild it")

        if device is not None:
            encoder.to(device)
            device = torch.device(device)
        else:
            param = next(iter(encoder.parameters()), None)
            device = param.device if param is not None else torch.device("cpu")
        encoder.eval()

        writer = _PartialWriter(path, fingerprint, np_dtype, all_tokens, resume,
                                compute={"autocast": "bfloat16" if autocast and device.type == "cuda" else None,
                                         "device_type": device.type})
        try:
            if not writer.finished:
                _run_encoder(writer, encoder, items, batch_size, device, np_dtype, progress,
                             autocast and device.type == "cuda", all_tokens, fingerprint)
                writer.finalize()
        finally:
            writer.close()  # on error the .partial directory stays, ready for resume=True
        writer.publish(overwrite)
        return cls.open(path, fingerprint)


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _run_encoder(writer: "_PartialWriter", encoder: nn.Module, items: Iterable, batch_size: int,
                 device: torch.device, np_dtype: np.dtype, progress: bool, use_autocast: bool,
                 all_tokens: bool, fingerprint: dict[str, Any]) -> None:
    from tqdm.auto import tqdm

    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(total=total, unit="item", desc=f"caching features -> {writer.final.name}",
               disable=not progress, dynamic_ncols=True)
    pending_ids: list[str] = []
    pending: list[torch.Tensor] = []
    pending_set: set[str] = set()
    want_k = None if all_tokens else fingerprint.get("num_layers")
    token_kwargs = {"token_layers": fingerprint["token_layers"]} if fingerprint.get("token_layers", 1) != 1 else {}

    def flush() -> None:
        try:
            x = torch.stack(pending)
        except RuntimeError as err:
            shapes = {m: tuple(t.shape) for m, t in zip(pending_ids, pending)}
            raise ValueError(f"media in one batch have different shapes: {shapes}") from err
        x = x.to(device, non_blocking=True)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = encoder(x, all_tokens=True, **token_kwargs) if all_tokens else encoder(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != len(pending_ids):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the encoder must return (batch={len(pending_ids)}, k, d) features, got {shape}")
        if want_k is not None and out.shape[1] != want_k:
            raise ValueError(f"the encoder returned {out.shape[1]} layers but the fingerprint says num_layers={want_k}")
        arr = out.detach().to("cpu", torch.float32).numpy().astype(np_dtype)
        if not np.isfinite(arr).all():
            bad = [m for m, row in zip(pending_ids, arr) if not np.isfinite(row).all()]
            hint = " (float16 overflow? use dtype='float32')" if np_dtype == np.float16 else ""
            raise ValueError(f"non-finite features for media {bad[:5]}{hint}")
        writer.append(pending_ids, arr)
        bar.update(len(pending_ids))
        pending_ids.clear()
        pending.clear()
        pending_set.clear()

    try:
        if writer.rows:
            bar.set_postfix_str(f"resumed at {writer.rows} rows", refresh=False)
        for item in items:
            try:
                media_id, source = item
            except (TypeError, ValueError) as err:
                raise TypeError(f"items must be (media_id, tensor_or_loader) pairs, got {item!r:.80}") from err
            key = _media_key(media_id)
            if key in writer.row_of or key in pending_set:
                bar.update(1)  # already computed (earlier run or duplicate id)
                continue
            pending_ids.append(key)
            pending_set.add(key)
            pending.append(_load_item(key, source))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    finally:
        bar.close()
    if not writer.rows:
        raise ValueError(f"{writer.final}: no items to cache")


class _PartialWriter:
    """Owns ``<path>.partial``: appends rows durably and records progress for resume."""

    def __init__(self, final: Path, fingerprint: dict[str, Any], np_dtype: np.dtype, all_tokens: bool,
                 resume: bool, compute: dict[str, Any]) -> None:
        self.final = final
        self.dir = partial_path(final)
        self.dtype = np_dtype
        self.rows = 0
        self.row_of: dict[str, int] = {}
        self.shape: tuple[int, int] | None = None
        self.finished = False
        self._ids_bytes = 0
        self.meta = {
            "format": FORMAT_VERSION,
            "complete": False,
            "fingerprint": fingerprint,
            "dtype": np_dtype.name,
            "all_tokens": all_tokens,
            "compute": compute,
            "epalm_version": _epalm_version(),
        }
        if self.dir.exists() and resume:
            self._resume()
        else:
            if self.dir.exists():
                shutil.rmtree(self.dir)
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir()
            atomic_write_json(self.dir / META_NAME, self.meta)
            self._commit()
        self._features = self._ids = None
        if self.finished:
            return
        features = self.dir / FEATURES_NAME
        self._features = open(features, "r+b" if features.exists() else "w+b")
        self._ids = open(self.dir / _IDS_NAME, "ab")
        if not features.stat().st_size:
            self._features.write(b"\0" * _HEADER_BYTES)  # placeholder; the real header is written last

    def _resume(self) -> None:
        where = self.dir
        old = _read_json(where / META_NAME, "metadata of the unfinished build", IncompleteCacheError)
        diff = fingerprint_diff(old.get("fingerprint", {}), self.meta["fingerprint"])
        for key in ("format", "dtype", "all_tokens"):
            if old.get(key) != self.meta[key]:
                diff.append((key, old.get(key), self.meta[key]))
        if diff:
            raise StaleCacheError(
                f"{where}: the unfinished build was made with different settings "
                f"({'; '.join(f'{k}: partial={_short(a)} now={_short(b)}' for k, a, b in diff)}); "
                "pass resume=False to discard it and start over",
                [k for k, _, _ in diff],
            )
        if old.get("complete") is True:  # crashed between finalize() and the rename
            self.meta = old
            self.finished = True
            return
        if (where / _PROGRESS_NAME).exists():
            progress = _read_json(where / _PROGRESS_NAME, "progress marker", IncompleteCacheError)
        else:  # interrupted before the first marker: nothing durable yet
            progress = {"rows": 0, "ids_bytes": 0, "shape": None}
        self.rows, self._ids_bytes = int(progress["rows"]), int(progress["ids_bytes"])
        self.shape = tuple(progress["shape"]) if progress.get("shape") else None
        ids_file = where / _IDS_NAME
        blob = b""
        if ids_file.exists():
            with open(ids_file, "rb") as f:
                blob = f.read(self._ids_bytes)
        ids = [json.loads(line) for line in blob.decode("utf-8").splitlines()]
        row_bytes = self._row_bytes()
        features = where / FEATURES_NAME
        need = _HEADER_BYTES + self.rows * row_bytes if self.rows else 0
        if (len(ids) != self.rows or len(blob) != self._ids_bytes
                or (features.stat().st_size if features.exists() else 0) < need):
            raise IncompleteCacheError(f"{where}: unfinished build is damaged; pass resume=False to start over")
        self.row_of = {m: i for i, m in enumerate(ids)}
        # drop whatever was written after the last progress marker
        if ids_file.exists():
            os.truncate(ids_file, self._ids_bytes)
        if features.exists():
            os.truncate(features, max(need, _HEADER_BYTES))

    def _row_bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize if self.shape else 0

    def append(self, ids: list[str], arr: np.ndarray) -> None:
        if self.shape is None:
            self.shape = tuple(int(s) for s in arr.shape[1:])
        elif tuple(arr.shape[1:]) != self.shape:
            raise ValueError(f"encoder output {tuple(arr.shape[1:])} per item differs from earlier {self.shape}")
        self._features.seek(_HEADER_BYTES + self.rows * self._row_bytes())
        self._features.write(np.ascontiguousarray(arr).tobytes())
        lines = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in ids).encode("utf-8")
        self._ids.write(lines)
        for m in ids:
            self.row_of[m] = self.rows
            self.rows += 1
        self._ids_bytes += len(lines)
        # data first, then the marker: a crash never leaves a marker pointing past durable rows
        for f in (self._features, self._ids):
            f.flush()
            os.fsync(f.fileno())
        self._commit()

    def _commit(self) -> None:
        atomic_write_json(self.dir / _PROGRESS_NAME,
                          {"rows": self.rows, "ids_bytes": self._ids_bytes, "shape": self.shape}, indent=None)

    def close(self) -> None:
        for f in (getattr(self, "_features", None), getattr(self, "_ids", None)):
            if f is not None and not f.closed:
                f.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    def finalize(self) -> None:
        """Write the real .npy header, the index and, last, ``complete: true`` (still in .partial)."""
        self._features.seek(0)
        self._features.write(_npy_header(self.dtype, (self.rows, *self.shape)))
        self._features.flush()
        os.fsync(self._features.fileno())
        self.close()
        ids = sorted(self.row_of, key=self.row_of.__getitem__)
        atomic_write_json(self.dir / INDEX_NAME, {m: i for i, m in enumerate(ids)}, indent=None)
        self.meta.update(rows=self.rows, shape=list(self.shape), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.meta["complete"] = True
        atomic_write_json(self.dir / META_NAME, self.meta)  # the completion flag, written last
        self.finished = True

    def publish(self, overwrite: bool) -> None:
        """Rename ``.partial`` to the final path (atomic on one file system)."""
        self.close()
        for name in (_PROGRESS_NAME, _IDS_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self.dir / name).unlink()
        _fsync_path(self.dir)
        trash = None
        if self.final.exists():
            if not overwrite:
                raise FileExistsError(f"{self.final}: a feature cache appeared while building; not replacing it")
            trash = self.final.with_name(f".{self.final.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.final, trash)
        os.rename(self.dir, self.final)
        _fsync_path(self.final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def open_or_build(
    path: str | os.PathLike,
    encoder: nn.Module,
    items: Iterable[tuple[MediaId, ItemSource]],
    fingerprint: dict[str, Any],
    *,
    rebuild_stale: bool = False,
    **build_kwargs: Any,
) -> tuple["FeatureCache", bool]:
    """The one open-or-build policy: ``(cache, reused)``.

    A complete cache with ``fingerprint`` that holds every item is reused. A missing one is built
    (an interrupted build with the same fingerprint is resumed); one lacking items is rebuilt. A
    published cache that no longer opens (damaged) raises :class:`IncompleteCacheError`, unless
    ``rebuild_stale``. A stale cache (other encoder, weights or preprocessing) raises
    :class:`StaleCacheError` naming what differs, unless ``rebuild_stale`` (folders whose name
    already encodes the settings, e.g. the quickstarts' caches under ``$EPALM_CACHE/features``).
    ``build_kwargs`` go to :meth:`FeatureCache.build`.
    """
    import shutil

    path = Path(path)
    items = list(items)
    try:
        cache = FeatureCache.open(path, fingerprint)
        if all(media_id in cache for media_id, _ in items):
            return cache, True
    except FileNotFoundError:
        pass
    except IncompleteCacheError as err:
        # caches are published complete, so a published one that no longer opens was damaged since:
        # a folder the user named is reported, not silently replaced; epalm's own folders are rebuilt
        if path.exists() and not rebuild_stale:
            raise IncompleteCacheError(f"{err} (delete the folder to rebuild it)") from err
    except StaleCacheError:
        if not rebuild_stale:
            raise
    build_kwargs = {**build_kwargs, "overwrite": True}
    try:
        return FeatureCache.build(path, encoder, items, fingerprint, resume=True, **build_kwargs), False
    except CacheError:  # an unfinished build made with other settings
        if not rebuild_stale:
            raise
        shutil.rmtree(partial_path(path), ignore_errors=True)
        return FeatureCache.build(path, encoder, items, fingerprint, resume=False, **build_kwargs), False
