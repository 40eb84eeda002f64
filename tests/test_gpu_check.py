"""`scripts/gpu-check` where no GPU is: its arguments, its whole flow on the CuPy stand-in
(`--stand-in`, small sizes), and micro-checks that do fail on a device that behaves wrongly. What
it finds on a GPU is for a GPU machine to say."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cupy_standin import DeviceArray, HostCuPy

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                      "gpu-check")


def gpu_check(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_START")}
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def script():
    loader = importlib.machinery.SourceFileLoader("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def test_arguments_are_checked_with_one_clear_line(tmp_path):
    for args, message in ((["--device-bench", "10x768"], "expected ROWSxDIM:K"),
                          (["--run-bench", "10x8:11"], "needs 1 <= K <= ROWS"),
                          (["--budget", "0"], "--budget must be > 0")):
        proc = gpu_check(*args, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    help_text = gpu_check("--help", cwd=tmp_path).stdout
    assert "--stand-in" in help_text and "10000000x768:10000" in help_text


def test_the_whole_check_runs_on_the_standin_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check("--stand-in", "--no-tests", "--out", str(out), "--device-bench",
                     "6000x32:30", "--run-bench", "2000x16:4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["environment"]["cupy"].endswith("host-stand-in")
    names = list(report["checks"])
    assert names[:2] == ["probe (kernel + matmul)", "bool argmax ties"]
    assert all(c["pass"] for c in report["checks"].values()) and len(names) == 10
    device = report["benchmarks"]["device"]
    assert device["rows"] == 6000 and device["fit_iterations"] >= 1
    assert set(device["seconds"]) == {"generate", "fit", "assign", "sort_and_download", "pairwise"}
    assert device["removed_at_eps_0_01"] > 0  # the planted 10% near-copies are found
    assert "wall" in report["benchmarks"]["run"]["output"][-1]
    assert sorted(os.listdir(out)) == ["bench-device.log", "bench-run.log", "gpu-check.json",
                                       "gpu-check.log"]
    assert "10 of 10 checks passed" in (out / "gpu-check.log").read_text()


def test_what_does_not_fit_the_budget_is_skipped_and_fails_the_check(tmp_path):
    proc = gpu_check("--stand-in", "--no-tests", "--out", str(tmp_path), "--budget", "25",
                     "--device-bench", "6000x32:30", "--run-bench", "none", cwd=tmp_path)
    assert proc.returncode == 1
    assert "FAIL  device benchmark 6,000 x 32, k=30: skipped:" in proc.stdout


class CopyingSlices(DeviceArray):
    """A device whose slices are copies: writes into a view are lost."""

    def __getitem__(self, key):
        got = super().__getitem__(key)
        return CopyingSlices(got._a.copy())


class LastTieArgmax(DeviceArray):
    def argmax(self, axis=None, out=None, dtype=None, keepdims=False):
        flipped = self._a[:, ::-1].argmax(axis=1)
        return DeviceArray(self._a.shape[1] - 1 - flipped)


class Misbehaving(HostCuPy):
    def __init__(self, array_type):
        super().__init__()
        self.array_type = array_type

    def asarray(self, a, dtype=None, order=None, *, blocking=False):
        return self.array_type(super().asarray(a, dtype)._a)

    def matmul(self, x1, x2, out=None, *, dtype=None):  # a TF32-like error of 1e-3
        return super().matmul(x1 + 1e-3, x2, out=out)


def test_micro_checks_fail_on_a_device_that_misbehaves(script):
    assert script.check_bool_argmax_ties(HostCuPy(), (64, 700))[0]
    assert not script.check_bool_argmax_ties(Misbehaving(LastTieArgmax), (64, 700))[0]
    assert script.check_masked_assignment_into_view(HostCuPy(), (40, 300))[0]
    assert not script.check_masked_assignment_into_view(Misbehaving(CopyingSlices), (40, 300))[0]
    assert script.check_matmul_out(HostCuPy(), (300, 64, 200))[0]
    passed, detail = script.check_matmul_out(Misbehaving(DeviceArray), (300, 64, 200))
    assert not passed and "max error 2." in detail
    assert np.isfinite(script.near_duplicates(10, 4, 0)).all()
