"""benchmarks/sinkhorn.py: its softmin counts, time limit, reference cache and goal table, on tiny inputs."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sinkhorn.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_sinkhorn", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _points(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed)) * 100


def test_geomloss_softmins_are_counted(bench):
    """Single-scale GeomLoss: 4 softmins to start, 4 per ε step, 4 for the last full iteration."""
    pytest.importorskip("geomloss")
    from geomloss import SamplesLoss

    loop = importlib.import_module(SamplesLoss.__module__.rpartition(".")[0] + ".sinkhorn_divergence")
    x, y = _points(60, 0), _points(50, 1)
    blur = 5.0
    steps = len(loop.scaling_parameters(x, y, 2, blur, None, None, 0.5)[2])
    value, counts = bench._geomloss_solve("geomloss-tensorized", y, blur)(x)
    assert counts == {"backend": "tensorized", "softmins": 4 * steps + 8}
    assert float(value) == pytest.approx(float(SamplesLoss("sinkhorn", p=2, blur=blur)(x, y)))


def test_geomed_softmins_add_the_envelope_pass(bench):
    from geomed import Measure, sinkhorn_divergence

    x, y = _points(60, 0), _points(50, 1)
    value, counts = bench._geomed_solve("geomed", y, 5.0)(x)
    result = sinkhorn_divergence(Measure.from_points(x), Measure.from_points(y), blur=5.0)
    assert counts["softmins"] == result.softmins + 4 > 4
    assert counts["iterations"] == result.iterations and counts["backend"] == result.backend
    assert float(value) == pytest.approx(float(result.value))


def test_a_run_past_its_time_limit_is_stopped(bench):
    task = {"task": "run", "library": "geomed", "inputs": "cube", "n": 100, "blur_fraction": 0.01,
            "backward": True, "repeats": 1}
    assert bench._child(task, "cpu", timeout=0.05) == {"finished": False, "failure": "timeout"}


def test_references_are_solved_once(bench, tmp_path, monkeypatch):
    calls = []

    def child(task, device, timeout):
        calls.append(task)
        return {"finished": True, "reference": task["kind"], "value": 2.0}

    monkeypatch.setattr(bench, "_REFERENCES_CACHE", tmp_path / "references.json")
    monkeypatch.setattr(bench, "_child", child)
    args = argparse.Namespace(reference_max=1000, converged_max=5000, blur_fraction=0.01, device="cpu", timeout=9)
    assert bench._reference("cube", 1000, args)["reference"] == "exact float64"
    assert bench._reference("cube", 1000, args)["value"] == 2.0
    assert bench._reference("cube", 5000, args)["reference"] == "converged geomed"
    assert bench._reference("cube", 5001, args) is None
    assert [task["n"] for task in calls] == [1000, 5000]


def test_table_checks_the_goals(bench):
    def row(library, n, seconds=None, error=None, peak=None):
        task = {"inputs": "cube", "n": n, "backward": True, "library": library}
        if seconds is None:
            return bench._row(task, {"finished": False, "failure": "timeout"}, None, "CPU", 1800)
        measured = {"finished": True, "seconds": seconds, "value": 1.0, "softmins": 100, "peak_mb": peak}
        return bench._row(task, measured, {"reference": "exact float64", "value": 1.0 + error}, "CPU", 1800)

    rows = [row("geomed", 10_000, 1.0, 1e-5, 500), row("geomloss-multiscale", 10_000, 4.0, 1e-3, 400),
            row("geomed", 100_000, 10.0, 1e-5, 1100), row("geomloss-multiscale", 100_000, 20.0, 1e-3, 900),
            row("geomed", 1_000_000, 500.0, 1e-5, 3000), row("geomloss-multiscale", 1_000_000)]
    lines = bench._table(rows, ["geomed", "geomloss-multiscale"]).splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    # speed-up, memory goal, speed goal: 100k misses both; 1M meets its memory goal, GeomLoss did not finish
    assert [(line[6], line[-2], line[-1]) for line in cells] == [("4×", "", "✓"), ("2×", "✗", "✗"),
                                                                  ("–", "✓", "")]
    assert cells[2][5] == "> 30 min"
