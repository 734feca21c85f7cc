"""Crash consistency: a run killed (SIGKILL) at every named fault point resumes to the very same run.

Each case runs tests/crash_run.py in a subprocess with ``EPALM_FAULT=<point>@<n>`` (killed the
n-th time the point is reached, see ``epalm.training.checkpoint.FAULT_POINTS``), checks that no complete
artefact was lost, resumes in this process, and compares with one uninterrupted run: trainable
weights of ``checkpoint/`` and ``best/`` bit for bit, ``best/metrics.json``, ``eval.csv`` and
``metrics.csv`` (each step exactly once). Also: no pickle anywhere, damaged or foreign checkpoints
are refused by name.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crash_run
from epalm.training import checkpoint as ckpt
from epalm.errors import CheckpointError

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"

# (fault point @ hit, a complete checkpoint must survive the crash, a complete best/ must survive)
# checkpoint hits: 1 step-3, 2 end of epoch 0, 3 step-6, 4 end of epoch 1, 5 step-9, 6 end of epoch 2
CASES = [
    ("checkpoint.tmp_partial@1", False, False),
    ("checkpoint.after_tmp_written@1", True, False),
    ("checkpoint.tmp_partial@3", True, True),
    ("checkpoint.after_tmp_written@3", True, True),
    ("checkpoint.between_renames@3", True, True),
    ("checkpoint.after_swap@3", True, True),
    ("checkpoint.during_old_removal@3", True, True),
    ("checkpoint.between_renames@6", True, True),
    ("best.tmp_partial@2", True, True),
    ("best.after_tmp_written@2", True, True),
    ("best.between_renames@2", True, True),
    ("best.after_swap@3", True, True),
    ("best.during_old_removal@2", True, True),
    ("train.after_log_row@5", True, True),
    ("train.during_eval@1", True, False),
    ("train.after_eval_row@2", True, True),
    ("train.during_eval@3", True, True),  # the final evaluation, after the last step's checkpoint
]
RESULTS: dict[str, dict] = {}  # filled by the tests, summarised by test_zz_summary


def _spawn(out: Path, fault: str | None, resume: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]), "OMP_NUM_THREADS": "1"}
    env.pop("EPALM_FAULT", None)
    if fault:
        env["EPALM_FAULT"] = fault
    argv = [sys.executable, str(HERE / "crash_run.py"), str(out)] + (["--resume"] if resume else [])
    return subprocess.run(argv, env=env, capture_output=True, timeout=300).returncode


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "epalm_weights.safetensors"))


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert _spawn(out, None) == 0
    return out


def _compare(run: Path, ref: Path) -> list[str]:
    problems = []
    for name in ("checkpoint", "best"):
        if not _same(run / name, ref / name):
            problems.append(f"{name}/ weights differ")
    if json.loads((run / "best" / "metrics.json").read_text()) != json.loads((ref / "best" / "metrics.json").read_text()):
        problems.append("best/metrics.json differs")
    for log in ("metrics.csv", "eval.csv"):
        got = [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "mfu"} for r in _rows(run / log)]
        want = [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "mfu"} for r in _rows(ref / log)]
        if got != want:
            problems.append(f"{log} rows differ: {[r['step'] for r in got]} vs {[r['step'] for r in want]}")
    if json.loads((run / "checkpoint" / "trainer_state.json").read_text()) != json.loads(
            (ref / "checkpoint" / "trainer_state.json").read_text()):
        problems.append("trainer_state.json differs")
    leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old")))
    if leftovers:
        problems.append(f"leftovers {leftovers}")
    return problems


@pytest.mark.parametrize("point, has_checkpoint, has_best", CASES, ids=[c[0] for c in CASES])
def test_kill_at_fault_point_then_resume_is_exact(point, has_checkpoint, has_best, reference, tmp_path):
    out = tmp_path / "run"
    rc = _spawn(out, point)
    assert rc == -9, f"the run was not killed at {point} (exit {rc})"
    lost = []
    if has_checkpoint and ckpt.latest(out, "checkpoint") is None:
        lost.append("checkpoint")
    if has_best and ckpt.latest(out, "best") is None:
        lost.append("best")
    state = crash_run.make_trainer(str(out)).train(resume=True, allow_fresh=True)
    problems = _compare(out, reference)
    RESULTS[point] = {"lost": lost, "exact": not problems}
    assert not lost, f"complete artefacts lost after a crash at {point}: {lost}"
    assert not problems, problems
    assert state["step"] == crash_run.EPOCHS * crash_run.STEPS_PER_EPOCH


@pytest.mark.parametrize("point", ["train.after_eval_row@3", "checkpoint.between_renames@3", "train.during_eval@2"])
def test_mid_epoch_evaluations_resume_exactly(point, tmp_path, monkeypatch):
    """``eval_every=2``: mid-epoch rows at steps 2, 4, 8 (6 and 9 end epochs); a resume truncates
    eval.csv by step, so each evaluation appears exactly once, as in an uninterrupted run."""
    monkeypatch.setenv("CRASH_EVAL_EVERY", "2")
    ref = tmp_path / "ref"
    assert _spawn(ref, None) == 0
    evals = _rows(ref / "eval.csv")
    assert [int(r["step"]) for r in evals] == [2, 3, 4, 6, 8, 9]
    out = tmp_path / "run"
    assert _spawn(out, point) == -9
    crash_run.make_trainer(str(out)).train(resume=True, allow_fresh=True)
    problems = _compare(out, ref)
    assert not problems, problems


def test_two_crashes_in_a_row(reference, tmp_path):
    out = tmp_path / "run"
    assert _spawn(out, "checkpoint.between_renames@3") == -9
    assert _spawn(out, "best.between_renames@1", resume=True) == -9  # the resumed run dies too
    crash_run.make_trainer(str(out)).train(resume=True)
    problems = _compare(out, reference)
    RESULTS["two crashes"] = {"lost": [], "exact": not problems}
    assert not problems, problems


def test_resuming_a_finished_run_changes_nothing(reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "checkpoint" / ckpt.MANIFEST).read_text()
    state = crash_run.make_trainer(str(out)).train(resume=True)
    assert state["step"] == 9 and (out / "checkpoint" / ckpt.MANIFEST).read_text() == before
    assert not _compare(out, reference)


def test_checkpoints_hold_no_pickle(reference):
    for folder in (reference / "checkpoint", reference / "best"):
        for f in folder.iterdir():
            head = f.read_bytes()[:2]
            assert head != b"\x80\x02" and not f.name.endswith((".pt", ".pkl", ".bin")), f
    assert (reference / "checkpoint" / ckpt.STATE_TENSORS).is_file()


def test_damaged_or_foreign_checkpoints_are_refused(reference, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    state_file = out / "checkpoint" / ckpt.STATE_TENSORS
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="trainer_state.safetensors is 100 bytes"):
        crash_run.make_trainer(str(out)).train(resume=True)
    shutil.rmtree(out)
    shutil.copytree(reference, out)
    trainer = crash_run.make_trainer(str(out))
    trainer.fingerprint["train"]["batch_size"] = 4  # as if the config changed
    with pytest.raises(CheckpointError, match=r"train.batch_size: checkpoint 8, now 4"):
        trainer.train(resume=True)
    empty = tmp_path / "empty"
    with pytest.raises(CheckpointError, match="no checkpoint in .*empty"):
        crash_run.make_trainer(str(empty)).train(resume=True)


def test_a_pickled_trainer_state_is_never_loaded(reference, tmp_path):
    """An old-style checkpoint whose trainer_state.pt would write a marker file when unpickled."""
    import pickle
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    folder = out / "checkpoint"
    (folder / ckpt.MANIFEST).unlink()
    (folder / ckpt.STATE_TENSORS).unlink()
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"optimizer": Evil()}))
    with pytest.raises(CheckpointError, match="pickled trainer_state.pt, which is never loaded"):
        crash_run.make_trainer(str(out)).train(resume=True)
    assert not marker.exists()


def test_zz_summary(capsys):
    """Prints the figures of the crash campaign (run after the cases above)."""
    if not RESULTS:
        pytest.skip("run with the fault-point cases")
    exact = sum(r["exact"] for r in RESULTS.values())
    lost = sum(len(r["lost"]) for r in RESULTS.values())
    with capsys.disabled():
        print(f"\ncrash points tried: {len(RESULTS)}, resumed exactly: {exact}, artefacts lost: {lost}")
    assert exact == len(RESULTS) and lost == 0
