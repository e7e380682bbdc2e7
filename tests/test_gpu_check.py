"""bench/gpu_check.sh --cpu-smoke: the GPU check's steps at tiny sizes on the CPU, so the script cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def test_gpu_check_cpu_smoke_runs_every_step(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    expected = [
        r"ok: no ray/mlflow/optuna/pydantic imported",
        r"2 skipped",  # the CUDA tests, collected by their node ids
        r"baseline: torch fp32 matmul 128x4096 @ 4096x4096: [\d.]+ GFLOP/s",
        r"batch   64 fp32: +[\d.]+ s/epoch over 256 pairs, [\d.]+ GFLOP/step, +[\d.]+ GFLOP/s = \d+% of the fp32 matmul",
        r"--bf16 ignored: bf16 autocast is CUDA only",
        r"mAP@ALL [\d.]+ oracle \(\|diff\| [\d.e+-]+\)",
        r"mAP@ALL [\d.]+ evaluate_hashing on cpu; .* 21 concepts, .* 200 queries x 2000 database",
        r"pack 1: total +[\d.]+ pairs/s = 1\.00x one trial alone; .* peak resident \d+ MiB per trial",
        r"pack 2: total +[\d.]+ pairs/s = [\d.]+x one trial alone; .* peak resident \d+ MiB per trial",
        r"=== summary \(cpu-smoke, device cpu\): total [\d.]+ s",
        r"all steps ok",
    ]
    for pattern in expected:
        assert re.search(pattern, log), f"not in the log: {pattern}\n{log[-3000:]}"
    for name in ("environment", "cuda-tests", "train-fp32", "train-bf16", "map-mirflickr", "map-nuswide", "pack"):
        assert re.search(rf"=== step {name}: ok in [\d.]+ s", log), name


def test_gpu_check_fails_when_a_step_fails(tmp_path):
    # an interpreter that cannot run the steps: every step fails, the script says so and exits non-zero
    env = dict(os.environ, PYTHON="false")
    done = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "FAILED: environment" in (tmp_path / "gpu_check.log").read_text()
