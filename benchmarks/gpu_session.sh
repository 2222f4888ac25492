#!/usr/bin/env bash
# One GPU lease's worth of sampler figures, in order of priority, each step under its own limit:
#
#   OUT=/tmp/gpu VAR_REF=/path/to/VAR bash benchmarks/gpu_session.sh            # every step
#   OUT=/tmp/gpu bash benchmarks/gpu_session.sh d16bf16 d30bf16                 # some steps
#   SMOKE=1 JAX_PLATFORMS=cpu OUT=/tmp/gpu bash benchmarks/gpu_session.sh      # tiny, on a CPU
#
# Steps (default: all, in this order; one H200 lease of 15 minutes holds about two of them: each
# batch size is its own XLA compile, on an H200 for VAR-d16 67-122 s in bf16 and 129 s in float32
# at batch 1, and past the step's limit for float32 at batch 64 (285 s, the official included) and
# bf16 at batch 512 (160 s); a command may run 10 min):
#   d16bf16  bench_sample.py, VAR-d16 in bfloat16 (tokenizer too) against the official under
#            torch.autocast on the same GPU, batch 1 and 64
#   d16f32   the same in float32, both sides at true float32 (no TF32 in cuBLAS/cuDNN)
#   d30bf16  VAR-d30 in bfloat16, batch 1 and 64
#   d16big   VAR-d16 bf16 against the official at batch 256 (BBIG), the official timed first
#   d16max   VAR-d16 bf16 alone at batch 512 (the largest batch: the official at 64 is in d16bf16)
#   check    gpu_check.py's attention numerics (xla and the Pallas Triton kernel, at d16 sizes)
#   paths    gpu_check.py's var_jax.sample per attention path (bf16, batch 64)
#   train    gpu_check.py's train step of configs/var_d16.py per attention path (bf16, batch 32)
#   cmdbuf   VAR-d16 bf16 at batch 1 (ours alone) with the while loops in CUDA graphs too (XLA's
#            command buffers with WHILE and CONDITIONAL): is batch 1's x14 over the bound launch
#            overhead? (d16bf16's batch-1 row is the baseline)
#   unroll   the same with XLA's full unrolling of while loops (the 16-layer scan of each scale)
#
# A step's limit (seconds) can be set as LIMIT_<STEP>, e.g. LIMIT_CHECK=150; the batch sizes as
# B16 (d16bf16, d16f32), B30 (d30bf16), BBIG (d16big), BMAX (d16max), e.g. B16=1 BBIG=128.
# Each step's output goes to $OUT/<step>.log; every JSON line of all steps to $OUT/rows.jsonl.
# A step that runs past its limit is killed (the rows it printed stay) and the next one starts.
# JAX does not preallocate the GPU here, so the official models (torch, same process) find room
# beside ours.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/var_jax_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
PY=${PYTHON:-python3}
STEPS=${*:-d16bf16 d16f32 d30bf16 d16big d16max check paths train cmdbuf unroll}
if [ "${SMOKE:-0}" = 1 ]; then
  # Tiny sizes, to try the script itself where there is no GPU: timings mean nothing.
  CHECK=(--allow-cpu --tiny) D16=(--depth 2) D30=(--depth 3) B16=${B16:-1,2} B30=${B30:-1}
  BBIG=${BBIG:-4} BMAX=${BMAX:-3} PATHS_BATCH=2 ITERS=1
else
  CHECK=() D16=(--depth 16) D30=(--depth 30) B16=${B16:-1,64} B30=${B30:-1,64} BBIG=${BBIG:-256}
  BMAX=${BMAX:-512} PATHS_BATCH=64 ITERS=3
fi
CMDBUF=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL
UNROLL=--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL
SAMPLE=(benchmarks/bench_sample.py --no-aot --greedy-batch 0 --iters "$ITERS")

step() {  # step NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, its output to a log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout --signal=KILL "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^{' "$OUT/$name.log" | grep -v -E '^(WARNING|I0000|W0000|E0000)' | tail -n 40
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>/dev/null
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
for s in $STEPS; do
  case $s in
    d16bf16) step d16bf16 ${LIMIT_D16BF16:-280} "$PY" "${SAMPLE[@]}" "${D16[@]}" --dtype bfloat16 --batch-sizes "$B16" ;;
    d16f32) NVIDIA_TF32_OVERRIDE=0 JAX_DEFAULT_MATMUL_PRECISION=highest step d16f32 ${LIMIT_D16F32:-280} "$PY" \
              "${SAMPLE[@]}" "${D16[@]}" --dtype float32 --batch-sizes "$B16" ;;
    d30bf16) step d30bf16 ${LIMIT_D30BF16:-330} "$PY" "${SAMPLE[@]}" "${D30[@]}" --dtype bfloat16 --batch-sizes "$B30" ;;
    d16big) step d16big ${LIMIT_D16BIG:-330} "$PY" "${SAMPLE[@]}" "${D16[@]}" --dtype bfloat16 --batch-sizes "$BBIG" ;;
    d16max) step d16max ${LIMIT_D16MAX:-330} "$PY" "${SAMPLE[@]}" "${D16[@]}" --dtype bfloat16 --no-official \
              --batch-sizes "$BMAX" ;;
    check) step check ${LIMIT_CHECK:-240} "$PY" benchmarks/gpu_check.py "${CHECK[@]}" --skip sampler,train \
              --out "$OUT/gpu_check.json" ;;
    paths) step paths ${LIMIT_PATHS:-280} "$PY" benchmarks/gpu_check.py "${CHECK[@]}" --skip numerics,train \
              --sample-batch-sizes "$PATHS_BATCH" --iters "$ITERS" --out "$OUT/gpu_check_paths.json" ;;
    train) step train ${LIMIT_TRAIN:-280} "$PY" benchmarks/gpu_check.py "${CHECK[@]}" --skip numerics,sampler \
              --iters "$ITERS" --out "$OUT/gpu_check_train.json" ;;
    cmdbuf) XLA_FLAGS="${XLA_FLAGS:-} $CMDBUF" step cmdbuf ${LIMIT_CMDBUF:-200} "$PY" "${SAMPLE[@]}" \
              "${D16[@]}" --dtype bfloat16 --no-official --batch-sizes 1 ;;
    unroll) XLA_FLAGS="${XLA_FLAGS:-} $UNROLL" step unroll ${LIMIT_UNROLL:-300} "$PY" "${SAMPLE[@]}" \
              "${D16[@]}" --dtype bfloat16 --no-official --batch-sizes 1 ;;
    *) echo "unknown step $s (d16bf16 d16f32 d30bf16 d16big d16max check paths train cmdbuf unroll)"; exit 2 ;;
  esac
done
grep -h '^{' "$OUT"/*.log >"$OUT/rows.jsonl" 2>/dev/null
echo "rows: $(wc -l <"$OUT/rows.jsonl") JSON lines in $OUT/rows.jsonl"
