#!/usr/bin/env bash
# Everything this project measures on an accelerator, in one run (about 12 minutes on one GPU; each step has a time limit):
#   0. the Mosaic GPU kernels' tests on the device (implementation="mgpu" against dense; 1 minute at most),
#      then the pipelined ones (tuning(stages=2); 45 s at most: if they fail, step 2 sweeps stages=1 only)
#   1. the attention tests on the device (fused path: cuDNN / Pallas kernels against the references)
#   2. python -m benchmarks.attention --dtype bfloat16 --training_batch --mgpu_sweep
#                                    -> results/attention-gpu.json (with the mgpu knob sweep, key_block x
#                                       stages, forward+backward and forward alone, in mgpu_sweep)
#   3. python benchmarks/peers/flex_attention.py (PyTorch FlexAttention)  -> results/peers-gpu.json
#   4. python -m benchmarks.plot                                          -> results/attention-gpu.png + table
#   5. python -m benchmarks.models --dtype bfloat16 --training_batch --attention_implementations default mgpu
#                                    -> results/models-gpu.json (each AA model with the default and with mgpu)
#   6. python -m train on the GPU for 90 seconds (bfloat16, digits), stopped by SIGTERM (saves, exits 0)
#   7. python -m benchmarks.nnx (NNX vs linen train step) -> results/nnx-gpu.json
#
# Usage, from the repository root:
#   bash benchmarks/device.sh --fetch-wheels   # here (with PyPI): grain, ml-collections, tensorboardX
#                                              # and their missing needs as wheels into .whl/
#   bash benchmarks/device.sh [STEP ...]       # on the GPU machine (carry .whl): all steps, or those
#                                              # named (e.g. 0 2); results go to benchmarks/results/
#                                              # and, if set, $OUT
#   bash benchmarks/device.sh --dry-run        # any CPU: every step in its quick form (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
py=${PYTHON:-python3}
wheels=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 tensorboardX==2.6.5)

if [[ $mode == --fetch-wheels ]]; then
  echo /.whl/ >>.git/info/exclude
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
  exit 0
fi
if [[ -d .whl ]] && ! "$py" -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
step() { echo "=== $(date +%T) $*"; }

if [[ $mode == --dry-run ]]; then
  step "dry run: each step in its quick form on $("$py" -c 'import jax; print(jax.default_backend())')"
  "$py" -m pytest -q -p no:cacheprovider tests/test_fused.py -k folded
  "$py" -m pytest -q -x -p no:cacheprovider tests/test_mgpu.py -k on_the_device
  "$py" -m benchmarks.attention --quick --dtype bfloat16 --mgpu_sweep
  "$py" -m benchmarks.models --quick --dtype bfloat16 --attention_implementations default mgpu
  "$py" -m benchmarks.nnx --quick
  "$py" -m train --workdir "$(mktemp -d)" --config.num_train_steps=2 --config.eval_every_steps=2 \
    --config.dtype=bfloat16
  exit 0
fi

# On the GPU: the steps named on the command line (default: all), each under its own time limit,
# the log and each step's results copied to $OUT (if set) as soon as they exist.
steps=("$@")
[[ ${#steps[@]} -eq 0 || ${steps[0]} == run ]] && steps=(0 1 2 3 4 5 6 7)
out=${OUT:-}
mgpu_stages=(1 2) # step 2's sweep of the mgpu pipeline stages; step 0 drops 2 if its pipelined tests fail
save() { [[ -z $out ]] || cp "$@" "$out"/ 2>/dev/null || true; }
"$py" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices(); print(jax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
for s in "${steps[@]}"; do
  case $s in
  0)
    step "0. Mosaic GPU kernel tests on the GPU (implementation=mgpu against dense)"
    # First, and short: a kernel that fails to compile or run costs one minute, not the session.
    JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 60 "$py" -m pytest -q -x -p no:cacheprovider \
      tests/test_mgpu.py -k "on_the_device and not pipelined" || echo "mgpu tests FAILED (continuing to measure)"
    # A pipelining error can hang a kernel on its barriers: 45 s here, not step 2's whole limit.
    JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 45 "$py" -m pytest -q -x -p no:cacheprovider \
      tests/test_mgpu.py -k "on_the_device and pipelined" ||
      { mgpu_stages=(1) && echo "pipelined mgpu tests FAILED: step 2 sweeps stages=1 only"; }
    ;;
  1)
    step "1. attention tests on the GPU"
    # float32 matmuls at full precision: the tests compare float32 against float64 references at
    # 1e-5, and a GPU's default float32 matmul rounds its inputs to TensorFloat-32. The fused path's
    # tests (cuDNN in bfloat16, Triton in float32); the TPU interpreter stays on CPUs.
    JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 "$py" -m pytest -q -n 4 \
      -p no:cacheprovider tests/test_functional.py tests/test_fused.py tests/test_attention_weights.py \
      -k "fused and not tpu" || echo "attention tests FAILED (continuing to measure)"
    ;;
  2)
    step "2. attention benchmark"
    timeout 420 "$py" -m benchmarks.attention --dtype bfloat16 --training_batch --no_rss --mgpu_sweep \
      --mgpu_stages "${mgpu_stages[@]}" || echo "attention FAILED"
    save benchmarks/results/attention-gpu.json
    ;;
  3)
    step "3. FlexAttention peer"
    timeout 120 "$py" benchmarks/peers/flex_attention.py || echo "FlexAttention peer FAILED"
    save benchmarks/results/peers-gpu.json
    ;;
  4)
    step "4. plot"
    "$py" -m benchmarks.plot benchmarks/results/attention-gpu.json || echo "plot FAILED"
    save benchmarks/results/attention-gpu.png
    ;;
  5)
    step "5. model train steps"
    timeout 240 "$py" -m benchmarks.models --dtype bfloat16 --training_batch --attention_implementations default mgpu ||
      echo "models FAILED"
    save benchmarks/results/models-gpu.json
    ;;
  6)
    step "6. python -m train for 90 seconds"
    workdir=$(mktemp -d)
    timeout -s TERM 90 "$py" -m train --workdir "$workdir" --config.dtype=bfloat16 --config.batch_size=512 \
      --config.num_train_steps=100000 --config.eval_every_steps=500 --config.checkpoint_every_steps=1000 || true
    tail -n 3 "$workdir/metrics.jsonl" || true
    [[ -z $out ]] || cp "$workdir/metrics.jsonl" "$out/train-gpu-metrics.jsonl" || true
    ;;
  7)
    step "7. NNX vs linen train step"
    timeout 150 "$py" -m benchmarks.nnx || echo "NNX benchmark FAILED or timed out"
    save benchmarks/results/nnx-gpu.json
    ;;
  *) echo "error: unknown step $s (steps are 0-7)" >&2 && exit 2 ;;
  esac
done
step "done"
