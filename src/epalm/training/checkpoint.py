"""Run-folder checkpoints that survive a crash at any point, stored without pickle.

A checkpoint (``RUN/checkpoint``) or the best model (``RUN/best``) is a folder written in full
under ``RUN/.NAME.tmp`` and closed by a manifest, ``checkpoint.json``, written last (atomically):
it lists every file with its size and a sequence number. Only a folder whose manifest is intact
and whose files all have the listed sizes is *complete*. The swap is then

    NAME -> .NAME.old        (rename)
    .NAME.tmp -> NAME        (rename)
    .NAME.old removed        (manifest first, so a half-removed folder is never complete)

so at every instant one complete copy exists (``NAME``, ``.NAME.tmp`` or ``.NAME.old``).
:func:`recover` (called when resuming) promotes the newest complete copy back to ``NAME`` and
removes the others; it never removes the last complete copy.

The trainer state is ``trainer_state.safetensors`` (optimizer moments, RNG states as uint8
tensors) plus JSON (optimizer hyper-parameters, scheduler, Python RNG, data position), so loading a
shared run folder never unpickles anything.

Fault injection for tests: ``EPALM_FAULT=<point>`` (or ``<point>@N``, the N-th time the point is
reached) kills the process with SIGKILL at that point; :data:`FAULT_POINTS` lists them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from epalm.errors import CheckpointError
from epalm.data.feature_cache import fingerprint_diff
from epalm.io import atomic_write_json, fsync_dir

MANIFEST = "checkpoint.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = 1

# where EPALM_FAULT can kill the process (the ``checkpoint`` and ``best`` swaps have the same points)
SWAP_POINTS = ("tmp_partial", "after_tmp_written", "between_renames", "after_swap", "during_old_removal")
FAULT_POINTS = (
    *(f"checkpoint.{p}" for p in SWAP_POINTS),
    *(f"best.{p}" for p in SWAP_POINTS),
    "train.after_log_row",  # a metrics.csv row written, its checkpoint not yet
    "train.during_eval",  # inside the evaluation of an epoch
    "train.after_eval_row",  # eval.csv row written, best/ and the checkpoint not yet
)
_hits: dict[str, int] = {}


def fault(point: str) -> None:
    """Test hook: SIGKILL this process when ``EPALM_FAULT`` names ``point`` (``point@N``: N-th hit)."""
    spec = os.environ.get("EPALM_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ complete folders and the swap
def _tmp(out: Path, name: str) -> Path:
    return out / f".{name}.tmp"


def _old(out: Path, name: str) -> Path:
    return out / f".{name}.old"


def read_manifest(folder: Path) -> tuple[dict | None, str]:
    """``(manifest, "")`` for a complete folder, else ``(None, why it is not complete)``."""
    path = folder / MANIFEST
    if not folder.is_dir():
        return None, "missing"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if (folder / "trainer_state.pt").exists():
            return None, ("written by an older epalm (a pickled trainer_state.pt, which is never loaded: "
                          "unpickling runs code); start the run again")
        return None, f"no {MANIFEST} (an unfinished write)"
    except (OSError, ValueError) as err:
        return None, f"{MANIFEST} is unreadable ({err})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("seq"), int):
        return None, f"{MANIFEST} is malformed"
    for fname, size in files.items():
        p = folder / str(fname)
        if not p.is_file():
            return None, f"{fname} is missing"
        if p.stat().st_size != size:
            return None, f"{fname} is {p.stat().st_size} bytes, {MANIFEST} says {size} (truncated or damaged)"
    return manifest, ""


def candidates(out: Path, name: str) -> list[tuple[Path, dict | None, str]]:
    """``(folder, manifest or None, reason)`` for ``NAME``, ``.NAME.tmp`` and ``.NAME.old``."""
    return [(p, *read_manifest(p)) for p in (out / name, _tmp(out, name), _old(out, name)) if p.exists()]


def latest(out: Path, name: str) -> tuple[Path, dict] | None:
    """The newest complete copy of ``NAME`` (highest sequence number), or None."""
    done = [(m["seq"], p, m) for p, m, _ in candidates(out, name) if m is not None]
    if not done:
        return None
    _, path, manifest = max(done, key=lambda t: t[0])
    return path, manifest


def _remove(folder: Path) -> None:
    """Remove a folder, its manifest first: half removed, it is never mistaken for a complete one."""
    if not folder.exists():
        return
    (folder / MANIFEST).unlink(missing_ok=True)
    fsync_dir(folder)
    shutil.rmtree(folder)


def write_swapped(out: Path, name: str, write: Callable[[Path], dict | None]) -> Path:
    """Write ``out/name`` through ``.name.tmp`` + manifest + two renames (see the module doc).

    ``write(folder)`` writes the files and may return extra fields for the manifest."""
    final, tmp, old = out / name, _tmp(out, name), _old(out, name)
    newest = latest(out, name)
    seq = (newest[1]["seq"] + 1) if newest else 1
    if newest and newest[0] != final:  # a crashed swap left the newest copy aside: put it back first
        recover(out, name)
    _remove(tmp)
    tmp.mkdir(parents=True)
    extra = write(tmp)
    fault(f"{name}.tmp_partial")
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(tmp / MANIFEST, {"format": FORMAT, "seq": seq, "files": files, **(extra or {})})
    fault(f"{name}.after_tmp_written")
    _remove(old)
    if final.exists():
        final.rename(old)
        fsync_dir(out)
    fault(f"{name}.between_renames")
    tmp.rename(final)
    fsync_dir(out)
    fault(f"{name}.after_swap")
    if old.exists():
        (old / MANIFEST).unlink(missing_ok=True)
        fault(f"{name}.during_old_removal")
        _remove(old)
    return final


def recover(out: Path, name: str) -> Path | None:
    """Make the newest complete copy ``out/name`` and remove the others; None when there is none.

    A crash inside this function is safe too: the newest complete copy is only ever renamed.
    """
    newest = latest(out, name)
    if newest is None:
        return None
    path, _ = newest
    final, tmp, old = out / name, _tmp(out, name), _old(out, name)
    if path == tmp:
        _remove(old)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    elif path == old:
        _remove(tmp)
        _remove(final)
        old.rename(final)
    fsync_dir(out)
    _remove(tmp)
    _remove(old)
    return final


def describe_missing(out: Path, name: str) -> str:
    """Why there is no complete ``out/name`` (for error messages)."""
    found = candidates(out, name)
    if not found:
        return f"no {name}/ in {out}"
    return "; ".join(f"{p}: {why}" for p, m, why in found if m is None)


# ------------------------------------------------------------------ trainer state without pickle
def _rng_state() -> tuple[dict, dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(),
               "rng.numpy": torch.from_numpy(np_state[1].astype("<u4").view(np.uint8).copy())}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    info = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], *[_plain(v) for v in np_state[2:]]],
            "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    return tensors, info


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _set_rng_state(tensors: dict, info: dict) -> None:
    version, internal, gauss = info["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, pos, has_gauss, cached = info["numpy"]
    keys = tensors["rng.numpy"].numpy().view("<u4").astype(np.uint32)
    np.random.set_state((str(kind), keys, int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and info.get("cuda_devices"):
        states = [tensors[f"rng.cuda.{i}"] for i in range(info["cuda_devices"])]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


def write_trainer_state(folder: Path, optimizer_state: dict, scheduler_state: dict, state: dict) -> dict:
    """Write ``trainer_state.safetensors`` + ``trainer_state.json``; return the JSON part for the manifest."""
    from safetensors.torch import save_file

    tensors, rng = _rng_state()
    opt_json: dict[str, dict] = {}
    for pid, values in optimizer_state["state"].items():
        plain = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):  # pid: an index, or a parameter name (FSDP's full state)
                tensors[f"optimizer|{pid}|{key}"] = value.detach().contiguous().cpu()
            else:
                plain[key] = value
        opt_json[str(pid)] = plain
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in optimizer_state["param_groups"]]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / STATE_TENSORS), metadata={"format": "pt"})
    atomic_write_json(folder / STATE_JSON, state)
    return {"optimizer": {"state": opt_json, "param_groups": groups,
                          "tensor_keys": sorted(k for k in tensors if k.startswith("optimizer|"))},
            "scheduler": scheduler_state, "rng": rng}


def read_trainer_state(folder: Path, manifest: dict) -> tuple[dict, dict, dict]:
    """``(optimizer state dict, scheduler state dict, trainer state)``; restores the RNG states."""
    from safetensors.torch import load_file

    where = folder / STATE_TENSORS
    try:
        tensors = load_file(str(where))
        state = json.loads((folder / STATE_JSON).read_text())
        trainer = manifest["trainer"]
        opt = trainer["optimizer"]
        def param_id(pid: str) -> int | str:  # JSON keys are strings: indices back to ints
            return int(pid) if pid.isdigit() else pid

        per_param: dict[int | str, dict] = {}
        for pid, plain in opt["state"].items():
            per_param[param_id(pid)] = dict(plain)
        for key in opt["tensor_keys"]:
            _, pid, name = key.split("|", 2)
            per_param.setdefault(param_id(pid), {})[name] = tensors[key]
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in opt["param_groups"]]
        for key in ("step", "epoch", "batch"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"{STATE_JSON}: {key!r} must be an integer >= 0, got {state.get(key)!r}")
        _set_rng_state(tensors, trainer["rng"])
        scheduler = trainer["scheduler"]
        if not isinstance(scheduler, dict):
            raise ValueError("the scheduler state is not a mapping")
    except CheckpointError:
        raise
    except Exception as err:  # safetensors, json and shape errors: one message naming the folder
        raise CheckpointError(f"{folder}: damaged trainer state ({type(err).__name__}: {err}); "
                              "resume from another run folder or start again with --overwrite") from err
    return {"state": per_param, "param_groups": groups}, scheduler, state


def check_fingerprint(folder: Path, saved: dict | None, current: dict) -> None:
    """Refuse to resume a run whose configuration differs, naming every differing field."""
    if saved is None:
        return
    diff = fingerprint_diff(saved, current)
    if diff:
        fields = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in diff[:8])
        raise CheckpointError(f"{folder} was trained with a different configuration ({fields}"
                              f"{'; ...' if len(diff) > 8 else ''}); resume with the same settings, "
                              "or train into a new output_dir")
