"""geomed's Sinkhorn divergence against GeomLoss on the same inputs, in one run: time, accuracy, softmins, memory.

Every (library, inputs, N) run on a CPU is a fresh subprocess, so that its peak resident memory is its own: it
reports the wall seconds of the timed call(s) (the timer starts after the imports and the input loading; the
first call and the best of ``--repeats``), the value, ``baseline_mb`` (VmHWM just before the timed call: the
interpreter, torch, the library and the inputs) and ``peak_mb`` (VmHWM at the end), and the softmin reductions
per solve (``softmins``). geomed's are ``OTResult.softmins`` (its Sinkhorn updates) plus the 4 reductions of the
value's envelope pass; it also reports ``iterations``, ``backend``, ``pattern_mb`` (the largest
``ScheduleStep.pattern_bytes`` of the schedule) and ``model_mb``, the memory model of the constants below.
GeomLoss's are the calls of the softmin that its ``sinkhorn_loop`` receives and of its ``extrapolate`` function
(a multiscale coarse-to-fine step: one softmin each): 4 at the start, 4 per ε step, 4 per extrapolation and 4
for the last full iteration (unless an extrapolation ends the loop). A run past ``--timeout`` is killed, with
whatever it started, and recorded with ``finished: false``. On a GPU (``--device cuda``, the default when one is
present) the runs share this process, without a time limit, and memory is the CUDA allocator's.

Inputs (float32, mm; cached in ``build/benchmark-inputs``):

- ``cube``: two uniform point clouds in the unit cube scaled to 100 mm, the second shifted by 10 mm;
- ``surface``: triangle centroids of two real distal femurs (``datasets.femur(1)`` and a smooth 2 mm deformation
  of it), subsampled to N; beyond the 39 991 triangles, N points uniform by area on the triangles;
- ``volume``: voxel centres of the tibia of ``datasets.knee_labels("A")`` (1.35 M voxels) and of the same voxels
  smoothly deformed, subsampled to N (volume-filling sets, where GeomLoss's default clustering biases the value).

Blur = 1% of the diameter unless ``--blur-fraction`` says otherwise; GeomLoss runs with its defaults (scaling
0.5), geomed with its own. Error = |value − reference| / reference, where the reference is geomed's exact
``online`` solve in float64 at marginal error 1e-3 up to ``--reference-max`` points, geomed's default solve (float32,
auto backend) run to ``tol=1e-4`` up to ``--converged-max`` ("converged geomed"), none beyond. Each reference is
solved once per (inputs, N) in a fresh subprocess and cached in ``build/benchmark-references.json``.

A quick check runs with the defaults; issue #20's full benchmark is::

    python benchmarks/sinkhorn.py --sizes 10000 50000 100000 200000 1000000 --inputs cube surface volume \\
        --libraries geomed geomloss-multiscale --passes fwd+bwd --repeats 1 --out benchmarks/results

Each run prints its line as it finishes and rewrites ``sinkhorn.csv`` and ``sinkhorn.json`` in ``--out``; the end
prints a markdown table, one row per (inputs, N, pass), comparing the first geomed and the first GeomLoss entry
of ``--libraries``, with the issue's goals checked (2 cores, float32, fwd+bwd, blur 1%, defaults): geomed's peak
under 1024 MB at 100k on every input, under 4096 MB and 600 s at 1M on the cube and the surface; ≥ 3× faster
than GeomLoss and ≥ 20× more accurate at 10k, 50k and 100k. The table is also written to ``sinkhorn.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

# The memory model of a geomed solve, restating that of geomed/ot/blocksparse.py's module docstring (persistent
# memory O(N + kept ranges), one group of a block-sparse softmin at a time):
#     model_mb = baseline_mb + (N + M) * BYTES_PER_POINT / 2**20 + pattern_mb + WORKING_MB.
# It leaves out the refined softmins' cache (≤ 256 MB per solve, as much as the final pattern needs). Measured
# (issue #20's run, benchmarks/results/README.md): 1M cube peak 1384 MB, model 1359 MB; at 100k the peaks lie
# 70–300 MB above the model, the cache's share; at 10k within 40 MB of it.
BYTES_PER_POINT = 400
WORKING_MB = 100

INPUTS = ("cube", "surface", "volume")
GEOMLOSS_BACKENDS = ("tensorized", "online", "multiscale")
FLASH_BACKENDS = ("symmetric", "multiscale")  # flash-sinkhorn 0.4.1 (CUDA only; multiscale: forward only)
FLASH_TOLERANCE = 1e-3  # its marginal-residual target, for values within ~0.1% of the converged one (as geomed's)


@dataclass(frozen=True)
class MemoryGoal:
    """Issue #20's memory goal at one N: geomed's peak under ``peak_mb`` (and its time under ``seconds``)."""

    peak_mb: float
    seconds: float | None
    inputs: tuple[str, ...]


MEMORY_GOALS = {100_000: MemoryGoal(1024, None, INPUTS), 1_000_000: MemoryGoal(4096, 600, ("cube", "surface"))}
SPEED_GOAL_SIZES = (10_000, 50_000, 100_000)
SPEED_GOAL = 3.0  # GeomLoss's time / geomed's
ACCURACY_GOAL = 20.0  # GeomLoss's error / geomed's

REFERENCES = {  # reference kind: the geomed solve that gives it
    "exact float64": {"dtype": torch.float64, "backend": "online", "tol": 1e-3},
    "converged geomed": {"dtype": torch.float32, "backend": "auto", "tol": 1e-4},
}
_REFERENCE_MAX_ITER = 20_000
_ENVELOPE_SOFTMINS = 4  # the value's envelope pass: xy, yx, and xx, yy of the debiasing (2 with debias=False)

_BUILD = Path(__file__).resolve().parents[1] / "build"
_INPUTS_CACHE = _BUILD / "benchmark-inputs"
_REFERENCES_CACHE = _BUILD / "benchmark-references.json"

COLUMNS = ("inputs", "n", "backward", "library", "backend", "device", "blur_mm", "finished", "failure",
           "time_limit_s", "seconds", "first_call_seconds", "value", "reference", "reference_value",
           "relative_error", "softmins", "iterations", "baseline_mb", "peak_mb", "pattern_mb", "model_mb")


# --- inputs -----------------------------------------------------------------------------------------------------

def _inputs(kind: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The two point sets (float32, mm), cached in ``build/benchmark-inputs`` (they need VTK/SimpleITK once)."""
    cached = _INPUTS_CACHE / f"{kind}-{n}-{seed}.pt"
    if cached.exists():
        return torch.load(cached)
    generator = torch.Generator().manual_seed(seed)
    if kind == "cube":
        x = torch.rand(n, 3, generator=generator) * 100
        y = torch.rand(n, 3, generator=generator) * 100 + torch.tensor([10.0, 0.0, 0.0])
    elif kind in ("surface", "volume"):
        points = _real_points(kind, n, generator)
        pick = torch.randperm(len(points), generator=generator)
        x = points[pick[:n]]
        y_source = points[pick[-n:]] if len(points) >= 2 * n else points[pick[:n]]
        x, y = x.float(), (y_source + 2.0 * torch.sin(y_source / 15.0)).float()
    else:
        raise ValueError(f"unknown inputs {kind!r}")
    _INPUTS_CACHE.mkdir(parents=True, exist_ok=True)
    torch.save((x, y), cached.with_suffix(".partial"))
    cached.with_suffix(".partial").replace(cached)
    return x, y


def _real_points(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Femur triangle centroids (or, for N beyond the triangle count, 2N points uniform by area on the triangles);
    tibia voxel centres."""
    from geomed import Measure, datasets

    if kind == "volume":
        knee = datasets.knee_labels("A")
        return Measure.from_labels(knee, ["tibia"], dtype=torch.float64)["tibia"].points
    mesh = datasets.femur(1)
    if n <= mesh.n_triangles:
        return Measure.from_mesh(mesh, dtype=torch.float64).points
    corners = torch.tensor(mesh.vertices)[torch.tensor(mesh.triangles, dtype=torch.long)]
    triangle = torch.multinomial(torch.as_tensor(mesh.triangle_areas()), 2 * n, replacement=True,
                                 generator=generator)
    u, v = torch.rand(2, 2 * n, 1, generator=generator, dtype=torch.float64)
    root = u.sqrt()
    a, b, c = corners[triangle].unbind(1)
    return (1 - root) * a + root * (1 - v) * b + root * v * c


def _diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    both = torch.cat([x, y])
    return float((both.amax(0) - both.amin(0)).norm())


# --- one run (in its own process on a CPU) ----------------------------------------------------------------------

def _run(library: str, inputs: str, n: int, blur_fraction: float, backward: bool, repeats: int,
         device: str) -> dict:
    """Time ``repeats`` solves (+ backward) of one library on one pair of inputs, in this process.

    Returns
    -------
    dict
        ``blur_mm``, ``seconds`` (best call), ``first_call_seconds``, ``value``, ``baseline_mb`` and ``peak_mb``
        (VmHWM before the timed calls and at the end; CUDA: allocated bytes), the solver's counts (``backend``,
        ``softmins``; geomed: ``iterations``, ``pattern_mb``) and, for geomed, ``model_mb``.
    """
    device = torch.device(device)
    x, y = (points.to(device) for points in _inputs(inputs, n))
    blur = blur_fraction * _diameter(x, y)
    solvers = {"geomed": _geomed_solve, "geomloss": _geomloss_solve, "flash": _flash_solve}
    solve = solvers[library.partition("-")[0]](library, y, blur)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline_mb = _peak_mb(device)
    times = []
    for _ in range(repeats):
        points = x.clone().requires_grad_(backward)
        _synchronize(device)
        start = time.perf_counter()
        value, counts = solve(points)
        if backward:
            value.backward()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    measured = {"blur_mm": blur, "seconds": min(times), "first_call_seconds": times[0], "value": float(value),
                "baseline_mb": baseline_mb, "peak_mb": _peak_mb(device), **counts}
    if library.startswith("geomed"):
        measured["model_mb"] = _model_mb(baseline_mb, len(x) + len(y), counts["pattern_mb"])
    return measured


def _geomed_solve(library: str, y: torch.Tensor, blur: float):
    """``solve(points) -> (value, counts)``: geomed's divergence from ``points`` to ``y`` with the backend that
    ``library`` names ("geomed": auto), and its per-solve counts."""
    from geomed import Measure, sinkhorn_divergence

    backend = library.removeprefix("geomed").removeprefix("-") or "auto"

    def solve(points: torch.Tensor) -> tuple[torch.Tensor, dict]:
        result = sinkhorn_divergence(Measure.from_points(points), Measure.from_points(y), blur=blur, backend=backend)
        pattern_bytes = max((step.pattern_bytes for step in result.schedule), default=0)
        return result.value, {"backend": result.backend, "softmins": result.softmins + _ENVELOPE_SOFTMINS,
                              "iterations": result.iterations, "pattern_mb": pattern_bytes / 2**20}

    return solve


def _geomloss_solve(library: str, y: torch.Tensor, blur: float):
    """``solve(points) -> (value, counts)``: GeomLoss's ``SamplesLoss("sinkhorn")`` from ``points`` to ``y`` with
    the backend that ``library`` names, and the softmins its Sinkhorn loop computed."""
    from geomloss import SamplesLoss

    backend = library.removeprefix("geomloss-")
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, backend=backend)
    # geomloss/sinkhorn_samples.py (geomloss/_legacy/ in 0.3.1), beside samples_loss.py, calls sinkhorn_loop
    samples = importlib.import_module(SamplesLoss.__module__.rpartition(".")[0] + ".sinkhorn_samples")

    def solve(points: torch.Tensor) -> tuple[torch.Tensor, dict]:
        counter = [0]
        with mock.patch.object(samples, "sinkhorn_loop", _counting_loop(samples.sinkhorn_loop, counter)):
            value = loss(points, y)
        return value, {"backend": backend, "softmins": counter[0]}

    return solve


def _flash_solve(library: str, y: torch.Tensor, blur: float):
    """``solve(points) -> (value, counts)``: flash-sinkhorn's debiased ``SamplesLoss("sinkhorn")`` with the cost
    |x − y|²/2 (``half_cost``, geomed's), TF32 as it defaults, stopped at a marginal residual of
    ``FLASH_TOLERANCE``; its ``multiscale`` backend has no gradients (run it with ``--passes fwd``)."""
    from flash_sinkhorn import SamplesLoss

    backend = library.removeprefix("flash-")
    stop = {"tol": FLASH_TOLERANCE} if backend == "multiscale" else {"threshold": FLASH_TOLERANCE}
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, debias=True, half_cost=True, backend=backend, **stop)

    def solve(points: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return loss(points, y), {"backend": backend}

    return solve


def _counting_loop(loop, counter: list[int]):
    """GeomLoss's ``sinkhorn_loop(softmin, ..., extrapolate=None, ...)`` that adds to ``counter[0]`` one per call
    of ``softmin`` and of ``extrapolate`` (one softmin each, through its own reference to the softmin)."""

    def counted(function):
        def call(*args, **kwargs):
            counter[0] += 1
            return function(*args, **kwargs)

        return call

    def counting_loop(softmin, *args, extrapolate=None, **kwargs):
        extrapolate = None if extrapolate is None else counted(extrapolate)
        return loop(counted(softmin), *args, extrapolate=extrapolate, **kwargs)

    return counting_loop


def _model_mb(baseline_mb: float, points: int, pattern_mb: float) -> float:
    """Peak memory (MB) that the memory model predicts (see ``BYTES_PER_POINT``)."""
    return baseline_mb + points * BYTES_PER_POINT / 2**20 + pattern_mb + WORKING_MB


def _peak_mb(device: torch.device) -> float:
    """Peak memory so far, MB: VmHWM of this process (CPU), or the CUDA allocator's peak since its reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak resident memory needs Linux)")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _solve_reference(inputs: str, n: int, blur_fraction: float, kind: str, device: str) -> dict:
    """The reference value of one pair of inputs (``kind`` in ``REFERENCES``), in this process."""
    from geomed import Measure, sinkhorn_divergence

    options = REFERENCES[kind]
    x, y = _inputs(inputs, n)
    blur = blur_fraction * _diameter(x, y)
    x, y = (points.to(device, options["dtype"]) for points in (x, y))
    start = time.perf_counter()
    result = sinkhorn_divergence(Measure.from_points(x), Measure.from_points(y), blur=blur, tol=options["tol"],
                                 max_iter=_REFERENCE_MAX_ITER, backend=options["backend"])
    return {"reference": kind, "value": float(result.value), "marginal_error": result.marginal_error,
            "converged": result.converged, "backend": result.backend, "seconds": time.perf_counter() - start}


# --- processes --------------------------------------------------------------------------------------------------

def _child(task: dict, device: str, timeout: float) -> dict:
    """Run ``task`` (``{"task": "run" | "reference", **arguments}``) in a fresh Python process.

    Returns
    -------
    dict
        Its answer with ``finished: True``; or ``finished: False`` and ``failure``: "timeout" when it ran past
        ``timeout`` seconds (it is then killed with every process it started), else its last line of stderr.
    """
    process = subprocess.Popen([sys.executable, __file__, "--job", json.dumps(task), "--device", device],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(process)
        return {"finished": False, "failure": "timeout"}
    except BaseException:  # interrupted: leave nothing running
        _stop(process)
        raise
    if process.returncode != 0:
        last = stderr.strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
        return {"finished": False, "failure": last[0]}
    return {"finished": True, **json.loads(stdout.strip().splitlines()[-1])}


def _stop(process: subprocess.Popen) -> None:
    """Kill ``process`` and everything it started (the process group of its session), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def _measure(task: dict, device: str, timeout: float) -> dict:
    """One run: on a GPU in this process (CUDA peak memory, no time limit), else in a fresh process."""
    if torch.device(device).type != "cuda":
        return _child(task, device, timeout)
    arguments = {key: value for key, value in task.items() if key != "task"}
    try:
        return {"finished": True, **_run(**arguments, device=device)}
    except Exception as error:  # a peer failing (out of memory, no KeOps) must not stop the table
        torch.cuda.empty_cache()
        return {"finished": False, "failure": f"{type(error).__name__}: {error}"}


def _reference(inputs: str, n: int, args: argparse.Namespace) -> dict | None:
    """The reference of (inputs, N) from ``build/benchmark-references.json``, else solved in a fresh process and
    stored there; None beyond ``--converged-max`` or when its solve failed."""
    if n > max(args.reference_max, args.converged_max):
        return None
    kind = "exact float64" if n <= args.reference_max else "converged geomed"
    key = f"{inputs} N={n} blur={args.blur_fraction!r} {kind}"
    known = json.loads(_REFERENCES_CACHE.read_text()) if _REFERENCES_CACHE.exists() else {}
    if key not in known:
        task = {"task": "reference", "inputs": inputs, "n": n, "blur_fraction": args.blur_fraction, "kind": kind}
        answer = _child(task, args.device, args.timeout)
        if not answer.pop("finished"):
            print(f"{inputs} N={n}: no {kind} reference: {answer['failure']}", file=sys.stderr, flush=True)
            return None
        known = json.loads(_REFERENCES_CACHE.read_text()) if _REFERENCES_CACHE.exists() else {}
        known[key] = answer
        _write_atomically(_REFERENCES_CACHE, json.dumps(known, indent=1))
    return known[key]


# --- rows, files and the table ----------------------------------------------------------------------------------

def _row(task: dict, measured: dict, reference: dict | None, device_name: str, time_limit: float | None) -> dict:
    """One output row (every column of ``COLUMNS``, None where it does not apply)."""
    row = dict.fromkeys(COLUMNS) | {key: task[key] for key in ("inputs", "n", "backward", "library")}
    row |= {"device": device_name, "time_limit_s": time_limit, **measured}
    if reference is not None:
        row |= {"reference": reference["reference"], "reference_value": reference["value"]}
    if reference is not None and row["finished"]:
        row["relative_error"] = abs(row["value"] - reference["value"]) / abs(reference["value"])
    return row


def _describe(row: dict) -> str:
    """The line printed when a run finishes."""
    head = f"{row['inputs']:8s} N={row['n']:>7d} {_pass(row['backward']):7s} {row['library']:20s}"
    if not row["finished"]:
        return f"{head} {_unfinished(row)}"
    error = "n/a" if row["relative_error"] is None else f"{row['relative_error']:.2e}"
    line = (f"{head} {row['backend']:10s} {row['seconds']:8.3f} s (first {row['first_call_seconds']:.3f} s)  "
            f"value={row['value']:.6g}  err={error}  softmins={row['softmins']}  peak={row['peak_mb']:.0f} MB "
            f"(baseline {row['baseline_mb']:.0f} MB")
    if row["model_mb"] is None:
        return line + ")"
    return line + (f", model {row['model_mb']:.0f} MB, patterns {row['pattern_mb']:.1f} MB)  "
                   f"iterations={row['iterations']}")


def _pass(backward: bool) -> str:
    return "fwd+bwd" if backward else "fwd"


def _unfinished(row: dict) -> str:
    if row["failure"] == "timeout":
        return f"did not finish in {_duration(row['time_limit_s'])}"
    return f"failed: {row['failure']}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


def _write(rows: list[dict], out: Path) -> None:
    """Rewrite ``sinkhorn.json`` and ``sinkhorn.csv`` (atomically) with every row so far."""
    _write_atomically(out / "sinkhorn.json", json.dumps(rows, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sinkhorn.csv.partial", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "sinkhorn.csv.partial").replace(out / "sinkhorn.csv")


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def _table(rows: list[dict], libraries: list[str]) -> str:
    """The markdown table: one line per (inputs, N, pass), the first geomed library of ``libraries`` against the
    first GeomLoss one, with issue #20's goals checked."""
    ours, theirs = _compared(libraries)
    lines = ["| inputs | N | pass | reference | geomed s | GeomLoss s | speed-up | geomed error | GeomLoss error "
             "| accuracy ratio | softmins geomed / GeomLoss | peak MB geomed / GeomLoss | memory goal | speed goal |",
             "|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|:-:|:-:|"]
    for key in dict.fromkeys((row["inputs"], row["n"], row["backward"]) for row in rows):
        group = {row["library"]: row for row in rows if (row["inputs"], row["n"], row["backward"]) == key}
        mine, peer = group.get(ours), group.get(theirs)
        reference = next((row["reference"] for row in (mine, peer) if row is not None and row["reference"]), "–")
        lines.append(" | ".join([
            f"| {key[0]}", f"{key[1]:,}", _pass(key[2]), reference, _time_cell(mine), _time_cell(peer),
            _ratio_cell(_speedup(mine, peer)), _error_cell(mine), _error_cell(peer),
            _ratio_cell(_accuracy(mine, peer)), _pair_cell(mine, peer, "softmins", "{:d}"),
            _pair_cell(mine, peer, "peak_mb", "{:.0f}"), _memory_goal(mine), _speed_goal(mine, peer)]) + " |")
    return "\n".join(lines)


def _compared(libraries: list[str]) -> tuple[str | None, str | None]:
    """The first geomed and the first GeomLoss library of ``libraries`` (None where there is none)."""
    return tuple(next((library for library in libraries if library.startswith(name)), None)
                 for name in ("geomed", "geomloss"))


def _finished(row: dict | None) -> bool:
    return row is not None and row["finished"]


def _time_cell(row: dict | None) -> str:
    if row is None:
        return "–"
    if not row["finished"]:
        return f"> {_duration(row['time_limit_s'])}" if row["failure"] == "timeout" else "failed"
    return _number(row["seconds"])


def _has_error(row: dict | None) -> bool:
    return row is not None and row["relative_error"] is not None


def _error_cell(row: dict | None) -> str:
    return f"{row['relative_error']:.1e}" if _has_error(row) else "–"


def _pair_cell(mine: dict | None, peer: dict | None, column: str, form: str) -> str:
    return " / ".join("–" if not _finished(row) else form.format(row[column]) for row in (mine, peer))


def _ratio_cell(ratio: float | None) -> str:
    return "–" if ratio is None else f"{_number(ratio)}×"


def _number(value: float) -> str:
    """Three significant digits, or whole units from 100 on."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _speedup(mine: dict | None, peer: dict | None) -> float | None:
    """GeomLoss's time / geomed's (best calls)."""
    return peer["seconds"] / mine["seconds"] if _finished(mine) and _finished(peer) else None


def _accuracy(mine: dict | None, peer: dict | None) -> float | None:
    """GeomLoss's relative error / geomed's."""
    if not (_has_error(mine) and _has_error(peer)):
        return None
    return peer["relative_error"] / mine["relative_error"] if mine["relative_error"] else float("inf")


def _memory_goal(mine: dict | None) -> str:
    """✓/✗ for geomed's peak (and time) at the sizes and inputs of ``MEMORY_GOALS``, fwd+bwd; empty elsewhere."""
    goal = MEMORY_GOALS.get(mine["n"]) if mine is not None and mine["backward"] else None
    if goal is None or mine["inputs"] not in goal.inputs:
        return ""
    met = mine["finished"] and mine["peak_mb"] < goal.peak_mb and (goal.seconds is None
                                                                  or mine["seconds"] < goal.seconds)
    return "✓" if met else "✗"


def _speed_goal(mine: dict | None, peer: dict | None) -> str:
    """✓/✗ for ≥ ``SPEED_GOAL``× faster and ≥ ``ACCURACY_GOAL``× more accurate than GeomLoss at
    ``SPEED_GOAL_SIZES``, fwd+bwd; – when undecided (a run or a reference missing); empty elsewhere."""
    if mine is None or mine["n"] not in SPEED_GOAL_SIZES or not mine["backward"]:
        return ""
    speedup, accuracy = _speedup(mine, peer), _accuracy(mine, peer)
    if speedup is None or accuracy is None:
        return "–"
    return "✓" if speedup >= SPEED_GOAL and accuracy >= ACCURACY_GOAL else "✗"


def _report(rows: list[dict], args: argparse.Namespace, device_name: str) -> str:
    """The markdown report: what ran, the goals, the table."""
    memory = "VmHWM of the run's fresh process" if device_name.startswith("CPU") else "CUDA allocator peak"
    ours, theirs = _compared(args.libraries)
    memory_goals = "; ".join(
        f"< {goal.peak_mb:g} MB{'' if goal.seconds is None else f' and < {goal.seconds:g} s'} at {n:,} "
        f"({', '.join(goal.inputs)})" for n, goal in MEMORY_GOALS.items())
    speed_sizes = ", ".join(f"{n:,}" for n in SPEED_GOAL_SIZES)
    return "\n".join([
        "# Sinkhorn divergence: geomed vs GeomLoss", "",
        f"Command: `python benchmarks/sinkhorn.py {' '.join(sys.argv[1:])}`", "",
        f"geomed = `{ours}`, GeomLoss = `{theirs}`; {device_name}, float32, blur = {args.blur_fraction:g} × "
        f"diameter. Time: best of {args.repeats} call(s), s; error: |value − reference| / reference; speed-up: "
        f"GeomLoss time / geomed time; accuracy ratio: GeomLoss error / geomed error; peak: {memory}.", "",
        f"Goals of issue #20 (fwd+bwd): memory ✓ = geomed's peak {memory_goals}; speed ✓ = ≥ {SPEED_GOAL:g}× "
        f"faster and ≥ {ACCURACY_GOAL:g}× more accurate than GeomLoss at {speed_sizes}.", "",
        _table(rows, args.libraries), ""])


# --- command line -----------------------------------------------------------------------------------------------

def _library(name: str) -> str:
    """``--libraries`` entries: geomed, geomed-<backend>, geomloss-<backend>, flash-<backend>."""
    from geomed.ot.problem import BACKENDS

    if name in ("geomed", *[f"geomed-{b}" for b in BACKENDS], *[f"geomloss-{b}" for b in GEOMLOSS_BACKENDS],
                *[f"flash-{b}" for b in FLASH_BACKENDS]):
        return name
    raise argparse.ArgumentTypeError(f"{name!r} is not geomed, geomed-<{'|'.join(BACKENDS)}>, "
                                     f"geomloss-<{'|'.join(GEOMLOSS_BACKENDS)}> or flash-<{'|'.join(FLASH_BACKENDS)}>")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 10000], metavar="N",
                        help="points per set (default: 1000 5000 10000)")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS),
                        help="point sets (default: all)")
    parser.add_argument("--libraries", type=_library, nargs="+", metavar="LIBRARY",
                        default=["geomed", *[f"geomloss-{b}" for b in reversed(GEOMLOSS_BACKENDS)]],
                        help="geomed (auto backend), geomed-<backend>, geomloss-<backend> or flash-<symmetric|multiscale> "
                             "(flash-sinkhorn 0.4.1, CUDA only); the table compares the "
                             "first geomed and the first GeomLoss entry (default: geomed geomloss-multiscale "
                             "geomloss-online geomloss-tensorized)")
    parser.add_argument("--blur-fraction", type=float, default=0.01,
                        help="blur as a fraction of the diameter of the two sets (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per run; the first and the best are reported (default: %(default)s)")
    parser.add_argument("--passes", choices=["fwd", "fwd+bwd", "both"], default="both",
                        help="time the value alone, the value and its gradient, or both (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu: one fresh process per run; cuda: runs in this process (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, metavar="SECONDS",
                        help="time limit of a run's (or a reference's) process on a CPU: past it the run is killed "
                             "and recorded as not finished (default: %(default)s)")
    parser.add_argument("--reference-max", type=int, default=20_000, metavar="N",
                        help="largest N whose error is against geomed's exact float64 solve (quadratic cost; "
                             "default: %(default)s)")
    parser.add_argument("--converged-max", type=int, default=200_000, metavar="N",
                        help="largest N whose error is against geomed's default solve run to tol=1e-4; beyond, "
                             "no error (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder of sinkhorn.csv, sinkhorn.json and sinkhorn.md (default: benchmarks/results)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # a run or a reference in a fresh process: JSON task
    return parser


def _terminate(signum: int, frame) -> None:
    """SIGTERM: exit through the ``finally`` and ``except`` clauses, so that a run in flight is stopped too."""
    raise SystemExit(128 + signum)


def main() -> None:
    args = _parser().parse_args()
    if args.job:
        task = json.loads(args.job)
        work = {"run": _run, "reference": _solve_reference}[task.pop("task")]
        print(json.dumps(work(**task, device=args.device)))
        return
    signal.signal(signal.SIGTERM, _terminate)
    cuda = torch.device(args.device).type == "cuda"
    device_name = torch.cuda.get_device_name(args.device) if cuda else f"CPU ({os.cpu_count()} cores)"
    time_limit = None if cuda else args.timeout
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    rows = []
    for inputs in args.inputs:
        for n in args.sizes:
            _inputs(inputs, n)  # made and cached here, so that no run's memory includes making them
            reference = _reference(inputs, n, args)
            for backward in passes:
                for library in args.libraries:
                    task = {"task": "run", "library": library, "inputs": inputs, "n": n,
                            "blur_fraction": args.blur_fraction, "backward": backward, "repeats": args.repeats}
                    rows.append(_row(task, _measure(task, args.device, args.timeout), reference, device_name,
                                     time_limit))
                    print(_describe(rows[-1]), flush=True)
                    _write(rows, args.out)
    report = _report(rows, args, device_name)
    _write_atomically(args.out / "sinkhorn.md", report)
    print("\n" + report)


if __name__ == "__main__":
    main()
