"""Smoke runs of the benchmark scripts in --tiny mode: they run, print one JSON line, write the file.

No timing assertions: the numbers of a tiny model on a shared CI machine mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def run_script(name: str, out: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--tiny", "--device", "cpu", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing"
    report = json.loads(lines[-1])
    assert out.is_file(), f"{name} did not write {out}"
    assert json.loads(out.read_text()) == report
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")], "temporary file left behind"
    return report


def test_bench_speed_tiny(tmp_path):
    out = tmp_path / "speed.json"
    report = run_script("bench_speed.py", out)
    for key in ("lm", "device", "device_name", "dtype", "batch", "seq", "new_tokens", "times_ms", "min_ms",
                "samples_per_s", "peak_mem_mb", "ratios", "ratios_paired", "targets", "meets_target",
                "machine", "torch", "transformers", "trainable_params"):
        assert key in report, key
    modes = {"train", "eval", "generate_greedy", "generate_beam3"}
    assert report["tiny"] is True and report["device"] == "cpu"
    assert set(report["times_ms"]) == {"bare", "epalm", "lin"}
    for who, per in report["times_ms"].items():
        assert set(per) == modes, who
        assert all(ms > 0 for ms in per.values())
        assert set(report["samples_per_s"][who]) == modes
        assert set(report["peak_mem_mb"][who]) == modes
    for variant in ("epalm", "lin"):
        assert set(report["ratios"][variant]) == modes
        assert all(r > 0 for r in report["ratios"][variant].values())
    assert report["trainable_params"]["lin"] < report["trainable_params"]["epalm"]


def test_bench_speed_subset_of_modes(tmp_path):
    report = run_script("bench_speed.py", tmp_path / "s.json", "--variants", "lin", "--modes", "train,eval")
    assert set(report["times_ms"]) == {"bare", "lin"}
    assert set(report["ratios"]["lin"]) == {"train", "eval"}


def test_bench_features_tiny(tmp_path):
    out = tmp_path / "features.json"
    report = run_script("bench_features.py", out)
    for key in ("encoder", "device", "device_name", "dtype", "batch", "stages", "output_shape", "machine",
                "torch", "transformers"):
        assert key in report, key
    assert report["stages"]["encoder"]["images_per_s"] > 0
    assert report["output_shape"][0] == report["batch"]
    pytest.importorskip("PIL")
    assert {"decode", "serial"} <= set(report["stages"])
    assert report["bound"]["stage"] in ("decode", "encoder")


def test_bench_speed_rejects_unknown_lm(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_speed.py"), "--lm", "no/such-lm",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode != 0
    assert "--lm must be one of" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_bench_data_tiny(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("soundfile")
    report = run_script("bench_data.py", tmp_path / "data.json")
    assert report["benchmark"] == "data" and report["tiny"] is True
    assert set(report["results"]) == {"image", "audio", "video"}
    for name, r in report["results"].items():
        assert set(r["by_workers"]) == {"0", "1", "2"}, name
        assert all(x["samples_per_s"] > 0 and x["samples"] == r["files"] for x in r["by_workers"].values())
        assert r["workers_for_target"] == -(-report["target_samples_per_s"] // r["per_core_samples_per_s"])


def test_gpu_check_tiny(tmp_path):
    pytest.importorskip("av")
    pytest.importorskip("soundfile")
    report = run_script("gpu_check.py", tmp_path / "gpu.json")
    assert report["ok"] is True, json.dumps(report["parts"])[-3000:]
    train = report["parts"]["train"]
    assert train["steps"] >= 2 and train["num_workers"] >= 1 and train["evaluated"] and train["checkpoint"]
    assert set(report["parts"]["speed"]["ratios"]["epalm"]) == {"train", "eval", "generate_greedy", "generate_beam3"}
    assert report["parts"]["data"]["results"]["image"]["per_core_samples_per_s"] > 0
    proj = report["projection"]
    assert proj["hours"] > 0 and proj["bound"] in ("gpu", "data")
    assert proj["hours"] == pytest.approx(8 * 443_757 / proj["samples_per_s"] / 3600)
