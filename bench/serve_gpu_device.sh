#!/usr/bin/env bash
# What bench/serve_gpu.py runs on the lent GPU machine, once vLLM is staged there
# (../shared/device/vllm-stage.sh: `prepare` once here, then `next` + a device call per part).
#   bash bench/serve_gpu_device.sh switch  # 8B switch test + the GPU tests (one call, ~5 min)
#   bash bench/serve_gpu_device.sh probe   # copy-rate probe, then the 8B switch test (one call, ~6 min)
#   bash bench/serve_gpu_device.sh serve   # the serving benchmark (one call, ~8 min)
#   bash bench/serve_gpu_device.sh followup # probe (one host kind) + serving run of (d), (a), (e)
#   bash bench/serve_gpu_device.sh main    # both in one call (tight in 10 minutes)
#   bash bench/serve_gpu_device.sh extra   # bench/switch.py (hf engine, 1B) + the GPU tests
# Results land in $OUT; the full log in $OUT/serve_gpu_device_log.txt.
set -u
export PYTHONPATH=/tmp/vllm-site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
export VLLM_WORKER_MULTIPROC_METHOD=spawn HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log=$OUT/serve_gpu_device_log.txt
t_end=$((SECONDS + ${DEVICE_BUDGET_S:-570}))
step() {
  local name=$1 t=$2; shift 2
  echo "=== $name start $(date -u +%T) (limit ${t}s)" | tee -a "$log"
  timeout -k 10 "$t" "$@" >>"$log" 2>&1
  echo "=== $name rc=$? $(date -u +%T)" | tee -a "$log"
}
case ${1:-main} in
switch)
  { nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv; df -h /tmp; free -g; nproc; } | tee -a "$log"
  step switch8b 330 python bench/serve_gpu.py switch --shape 8b --cycles 10 --out "$OUT" "${@:2}"
  grep -E "^(coe:|ablation|vllm sleep/wake|  loaded)" "$log" | cut -c1-400
  step pytest_gpu 170 python -m pytest tests/engines/test_vllm_gpu.py -v -p no:cacheprovider -o addopts= -x
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$log" | tail -8
  ;;
probe)
  { nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv; free -g; nproc; cat /sys/kernel/mm/transparent_hugepage/enabled; } | tee -a "$log"
  step probe 200 python bench/serve_gpu.py probe --shape 8b
  sed -n '/^| host buffer/,$p' "$log"
  step switch8b 330 python bench/serve_gpu.py switch --shape 8b --cycles 10 --out "$OUT" "${@:2}"
  grep -E "^(coe:|picked|  variant|  recaptured|vllm sleep/wake|  loaded)" "$log" | cut -c1-400
  ;;
followup)
  step probe 150 python bench/serve_gpu.py probe --shape 8b --hosts register
  sed -n '/^| host buffer/,$p' "$log"
  left=$((t_end - SECONDS - 5))
  step serve $left python bench/serve_gpu.py run --out "$OUT" --budget-s $((left - 10)) --system-timeout-s 80 --systems d_resident,a_coe,e_sleep_batch
  cat "$OUT"/serve_gpu_h*.md 2>/dev/null
  ;;
main)
  { nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv; df -h /tmp; free -g; nproc; } | tee -a "$log"
  step switch8b 170 python bench/serve_gpu.py switch --shape 8b --cycles 10 --out "$OUT"
  grep -E "^(coe:|vllm sleep/wake|loaded)" "$log" | cut -c1-400
  left=$((t_end - SECONDS - 15))
  step serve $left python bench/serve_gpu.py run --out "$OUT" --budget-s $((left - 15)) "${@:2}"
  grep -E "^(\[|== |trace:|engines ready|  retrying)" "$log" | cut -c1-500
  cat "$OUT"/serve_gpu_h*.md 2>/dev/null
  ;;
serve)
  { nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv; free -g; } | tee -a "$log"
  left=$((t_end - SECONDS - 5))
  step serve $left python bench/serve_gpu.py run --out "$OUT" --budget-s $((left - 10)) "${@:2}"
  grep -E "^(\[|== |trace:|engines ready|  retrying)" "$log" | cut -c1-500
  grep -E "one-pass|Traceback" "$log" | sort | uniq -c | head -5
  cat "$OUT"/serve_gpu_h*.md 2>/dev/null
  ;;
extra)
  step switch_py 170 python bench/switch.py --shape 1b --cycles 10 --out "$OUT"
  step pytest_gpu 120 python -m pytest tests/engines/test_vllm_gpu.py -q -p no:cacheprovider -o addopts= -x
  grep -E "passed|failed|error" "$log" | tail -3
  ;;
esac
grep -E "Traceback|Error" "$log" | sort | uniq -c | sort -rn | head -12
tail -c 1500 "$log"
