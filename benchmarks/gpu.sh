#!/usr/bin/env bash
# The GPU benchmark, as one script for a short lease of a GPU machine: the fused kernel rates, then geomed against
# GeomLoss forward+backward at 10k (float64 references) and 100k. GeomLoss's KeOps backends run only where geomed's
# probe finds a working KeOps (a broken KeOps build can crash the process).
# Then the kernel losses (benchmarks/kernels.py), the grid Sinkhorn (benchmarks/grid.py) and the MONAI losses
# (benchmarks/monai_losses.py, after the losses' CUDA tests). GRID_SIZES (default "64 128 256") sets the grid sizes.
# First, the tests of the GPU code compiled for the card (the fused softmin and range kernels, the grid solve's CUDA
# graph), which CI runs only under Triton's interpreter or not at all.
# Usage: benchmarks/gpu.sh OUT_DIR [SECTION ...], sections: tests rates sinkhorn kernels grid monai (default: all). Inputs
# are cached in build/benchmark-inputs by CPU runs of the benchmarks, since the GPU machine may lack VTK/SimpleITK.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [tests|rates|sinkhorn|kernels|grid|monai ...]}
shift
sections=${*:-tests rates sinkhorn kernels grid monai}
wants() { [[ " $sections " == *" $1 "* ]]; }
mkdir -p "$out"
export KEOPS_CACHE_FOLDER=${KEOPS_CACHE_FOLDER:-/tmp/keops-cache} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if command -v nvcc >/dev/null; then export CUDA_PATH=${CUDA_PATH:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# flash-sinkhorn travels as a wheel (pip download flash-sinkhorn==0.4.1 --no-deps -d build/wheels; carry build/wheels)
python3 -c "import flash_sinkhorn" 2>/dev/null || python3 -m pip install --quiet --no-deps build/wheels/flash_sinkhorn-0.4.1-*.whl
python3 -c "import torch, triton, geomloss, pykeops, flash_sinkhorn; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'pykeops', pykeops.__version__, 'geomloss', geomloss.__version__, 'flash-sinkhorn', flash_sinkhorn.__version__)"
if wants tests; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_triton_softmin.py \
    tests/test_triton_ranges.py tests/test_grid.py::test_grid_solve_replays_as_a_cuda_graph 2>&1 | tee "$out/gpu_tests.txt"
fi
if wants rates; then
python3 - <<'PY'
import time, torch
from geomed.ot.softmin import OnlineSoftmin
from geomed.ot.triton_softmin import TritonSoftmin
n = 100_000
x, y = torch.rand(1, n, 3, device="cuda") * 100, torch.rand(1, n, 3, device="cuda") * 100
h = torch.zeros(1, n, device="cuda")
for softmin in (TritonSoftmin(2), OnlineSoftmin.for_device(2, x.device)):
    for repeat in range(3):
        torch.cuda.synchronize(); start = time.perf_counter()
        s = softmin(3.0, x, y, h); torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    average = softmin.average(3.0, x, y, h, s, y); torch.cuda.synchronize(); start = time.perf_counter()
    softmin.average(3.0, x, y, h, s, y); torch.cuda.synchronize()
    print(f"{softmin.name:7s} 100k x 100k softmin {seconds * 1e3:8.2f} ms = {n * n / seconds / 1e9:7.1f} G evaluations/s; "
          f"average {(time.perf_counter() - start) * 1e3:8.2f} ms")
PY
fi
bench() { timeout "$1" python3 benchmarks/sinkhorn.py --device cuda --passes fwd+bwd "${@:2}"; }
if wants sinkhorn; then
peers=(geomloss-tensorized)
if python3 -c "import sys; from geomed._spatial import keops_available; sys.exit(not keops_available())"; then
  peers+=(geomloss-online geomloss-multiscale)
fi
bench 150 --sizes 10000 --inputs cube surface volume --out "$out/n10k" --repeats 3 \
  --libraries geomed geomed-online "${peers[@]}"
bench 200 --sizes 100000 --inputs cube surface volume --out "$out/n100k" --repeats 2 --reference-max 0 \
  --libraries geomed "${peers[@]:1}"
# forward against flash-sinkhorn (its multiscale backend has no gradients): geomed's multiscale (Triton ranges)
bench 300 --sizes 10000 100000 --inputs cube surface volume --out "$out/flash" --repeats 2 --passes fwd \
  --reference-max 10000 --libraries geomed geomed-multiscale flash-symmetric flash-multiscale
bench 200 --sizes 1000000 --inputs cube --out "$out/flash-1m" --repeats 1 --passes fwd --reference-max 0 \
  --libraries geomed-multiscale flash-multiscale
fi
if wants kernels; then
  timeout 240 python3 benchmarks/kernels.py --device cuda --sizes 50000 100000 --losses gaussian energy oriented \
    --libraries geomed geomed-keops geomloss-online geomloss-multiscale geomloss-tensorized --timeout 100 \
    --cache "$out/kernel-references.json" | tee "$out/kernels.txt"
fi
if wants grid; then
  # benchmarks/grid.py's blobs on the GPU: geomed's grid Sinkhorn and GeomLoss's image solver, fwd+bwd, one run each
  # after a warm-up at 16³ (a 256³ pair is the issue's memory goal).
  timeout 240 python3 - <<'PY' | tee "$out/grid.txt"
import os, sys, time, torch
sys.path.insert(0, "benchmarks")
from grid import _densities
from geomed import grid_sinkhorn_divergence
def run(library, size):
    a, b = (t.cuda() for t in _densities("blobs", size))
    a.requires_grad_()
    torch.cuda.reset_peak_memory_stats(); torch.cuda.synchronize(); start = time.perf_counter()
    if library == "geomed":
        value = grid_sinkhorn_divergence(a[None, None], b[None, None], blur=1.0).value.sum()
    else:
        import geomloss
        value = geomloss.sinkhorn_divergence(a[None, None], b[None, None], p=2, blur=1.0 / size).sum() * size**2
    value.backward(); torch.cuda.synchronize()
    return time.perf_counter() - start, float(value), torch.cuda.max_memory_allocated() / 2**20
for library in ("geomed", "geomloss"):
    try:
        run(library, 16)
    except Exception as error:
        print(library, "unavailable:", repr(error)[:200]); continue
    for size in [int(size) for size in os.environ.get("GRID_SIZES", "64 128 256").split()]:
        try:
            seconds, value, memory = run(library, size)
            print(f"{library:8s} {size}^3 fwd+bwd {seconds:8.3f} s  value {value:.6f} mm2  peak GPU {memory:8.0f} MB", flush=True)
        except Exception as error:
            print(f"{library:8s} {size}^3 failed: {repr(error)[:200]}", flush=True)
PY
fi
if wants monai; then
  # the losses' CUDA tests (GPU value and gradient = CPU's, bf16 autocast), then the timings
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_monai_losses.py -k cuda 2>&1 | tee "$out/monai_cuda_tests.txt"
  timeout 300 python3 benchmarks/monai_losses.py --device cuda --shapes 2x64 1x128 --losses sinkhorn sinkhorn-balanced \
    dice-sinkhorn boundary-kernel monai-dice monai-hausdorff monai-boundary sinkhorn-converged | tee "$out/monai_losses.txt"
fi
