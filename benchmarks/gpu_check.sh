#!/usr/bin/env bash
# GPU checks of pydagnn on a CUDA machine with CuPy and PyTorch:
#   1. the GPU tests (pytest -m gpu tests/: tests/test_gpu.py, GPU vs CPU for every layer, a
#      whole ResNet18-GM-SOP step, device reads per step),
#   2. training throughput and memory, pydagnn (bench_train.py --device gpu) against
#      plain PyTorch (torch_baseline.py): ResNet18-GM-SOP and ResNet18-GAP at batch 256,
#      WRN-36-2-GM-SOP at batch 150,
#   3. a short table (benchmarks/gpu_report.py).
# Logs and JSON lines go to $OUT (default /tmp/gpu_check); a failing stage does not stop
# the others. About 4-5 minutes on an H100/H200, CuPy's kernel compilation included.
#
#   bash benchmarks/gpu_check.sh                 # everything
#   STAGES="bench_gmsop tests" bash benchmarks/gpu_check.sh
# Stages: tests bench_gmsop bench_gap bench_wrn. Per-stage time limits (seconds):
# T_TESTS, T_BENCH, T_TORCH. PYTHON picks the interpreter (default python3).
# A CuPy kernel cache carried in .gpu_fixtures/cupy_cache.tgz is unpacked first, and the
# cache is packed into $OUT/cupy_cache.tgz at the end (copy it to .gpu_fixtures/ to
# skip the compilation next time).
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-"tests bench_gmsop bench_gap bench_wrn"}
T_TESTS=${T_TESTS:-150}
T_BENCH=${T_BENCH:-75}
T_TORCH=${T_TORCH:-60}
ITERS=${ITERS:-5}
LOG=$OUT/gpu_check.log
JSONL=$OUT/bench.jsonl
: > "$JSONL"
t_start=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - t_start ))s] $*" | tee -a "$LOG"; }

# pydagnn importable without installing it: pyproject maps the package pydagnn.layers to
# the folder layers/; a sitecustomize on PYTHONPATH adds that mapping (a meta-path finder)
# when pydagnn is not installed in this interpreter
if ! $PY -c 'import pydagnn.layers' >/dev/null 2>&1; then
    PD=$(mktemp -d /tmp/pydagnn_site.XXXX)
    cat > "$PD/sitecustomize.py" <<PYSITE
import importlib.util, os, sys
_ROOT = '$ROOT'
class _PydagnnLayers:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != 'pydagnn.layers':
            return None
        base = os.path.join(_ROOT, 'layers')
        return importlib.util.spec_from_file_location(
            name, os.path.join(base, '__init__.py'), submodule_search_locations=[base])
sys.meta_path.append(_PydagnnLayers)
PYSITE
    export PYTHONPATH=$ROOT:$PD${PYTHONPATH:+:$PYTHONPATH}
    $PY -c 'import pydagnn.layers.conv' || echo "[gpu_check] pydagnn does not import"
fi
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy_kernel_cache}
mkdir -p "$CUPY_CACHE_DIR"
if [ -f .gpu_fixtures/cupy_cache.tgz ]; then
    tar xzf .gpu_fixtures/cupy_cache.tgz -C "$CUPY_CACHE_DIR" && say "unpacked the carried CuPy kernel cache"
fi

say "machine: $(nvidia-smi -L 2>/dev/null | head -1)"
$PY - <<'EOF' 2>&1 | tee -a "$LOG"
import numpy, sys
try:
    import cupy; print('cupy', cupy.__version__, 'cuda runtime', cupy.cuda.runtime.runtimeGetVersion())
except Exception as e:
    print('cupy: not usable:', e)
try:
    import torch; print('torch', torch.__version__)
except Exception as e:
    print('torch: not usable:', e)
import pydagnn; from pydagnn import backend
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'pydagnn', pydagnn.__version__,
      'gpu_available', backend.gpu_available())
EOF

bench() {   # bench <label> <time limit> <command...>: JSON lines to $JSONL, the rest to the log
    local label=$1 limit=$2; shift 2
    say "$label: $*"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep '^{' >> "$JSONL"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || say "$label: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
}

for stage in $STAGES; do
    case $stage in
    tests)
        say "GPU tests"
        PYDAGNN_GPU_REPORT=$OUT/gpu_rel_err.json timeout "$T_TESTS" $PY -m pytest -m gpu -q -rs \
            -p no:cacheprovider tests/ 2>&1 | tee "$OUT/tests.log" | tail -60 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        [ "$rc" -eq 0 ] || say "GPU tests: FAILED (exit $rc$([ "$rc" -eq 124 ] && echo ', time limit'))"
        ;;
    bench_gmsop)
        bench "pydagnn ResNet18-GM-SOP b256" "$T_BENCH" $PY benchmarks/bench_train.py --device gpu \
            --model ResNet18-GM-SOP --batch 256 --iters "$ITERS" --warmup 2
        bench "torch ResNet18-GM-SOP b256" "$T_TORCH" $PY benchmarks/torch_baseline.py \
            --model ResNet18-GM-SOP --batch 256 --iters "$ITERS" --warmup 2 --cudnn-benchmark both
        ;;
    bench_gap)
        bench "pydagnn ResNet18-GAP b256" "$T_BENCH" $PY benchmarks/bench_train.py --device gpu \
            --model ResNet18-GAP --batch 256 --iters "$ITERS" --warmup 2 --no-test-pass
        bench "torch ResNet18-GAP b256" "$T_TORCH" $PY benchmarks/torch_baseline.py \
            --model ResNet18-GAP --batch 256 --iters "$ITERS" --warmup 2 --cudnn-benchmark both
        ;;
    bench_wrn)
        bench "pydagnn WRN-36-2-GM-SOP b150" "$T_BENCH" $PY benchmarks/bench_train.py --device gpu \
            --model WRN-36-2-GM-SOP --batch 150 --iters 3 --warmup 1 --profile-iters 0 --no-test-pass
        bench "torch WRN-36-2-GM-SOP b150" "$T_TORCH" $PY benchmarks/torch_baseline.py \
            --model WRN-36-2-GM-SOP --batch 150 --iters 3 --warmup 1 --cudnn-benchmark both
        ;;
    *) say "unknown stage $stage" ;;
    esac
done

$PY benchmarks/gpu_report.py "$JSONL" "$OUT/gpu_rel_err.json" 2>&1 | tee "$OUT/table.txt" | tee -a "$LOG"
(cd "$CUPY_CACHE_DIR" && tar czf "$OUT/cupy_cache.tgz" . 2>/dev/null) && \
    say "CuPy kernel cache: $(du -h "$OUT/cupy_cache.tgz" | cut -f1) in \$OUT/cupy_cache.tgz"
say "done"
