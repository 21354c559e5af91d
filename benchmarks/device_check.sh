#!/usr/bin/env bash
# Every check that needs the GPU machine, as two prepared runs of about 5 minutes each
# (one device call may last 10): `gpu` runs the gpu-marked tests, the 0.95B family merged
# with --cuda and the search's candidate merge on the GPU; `cpu` merges the same family on
# the machine's 16 CPU cores. From the project root on this machine run
# ../shared/device/prepare.sh, then the device tool with carry [".device"], timeout_s 560
# and the command `bash benchmarks/device_check.sh gpu` (then `... cpu`).
# Results come back under $OUT (the tables are also printed).
set -uo pipefail
PART="${1:-gpu}"
source .device/setup.sh || exit 1
OUT="${OUT:-/tmp/device-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
echo "cores: $(nproc)" | tee -a "$OUT/machine.txt"
case "$PART" in
  gpu)
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25 | tee "$OUT/gpu-tests.txt"
    python3 benchmarks/speed.py --family 1b --cuda -r 2 2>&1 | tee "$OUT/speed-1b-cuda.txt"
    python3 benchmarks/evolve_speed.py --family 1b --device cuda 2>&1 | tee "$OUT/evolve-1b-cuda.txt"
    ;;
  cpu)
    python3 benchmarks/speed.py --family 1b -r 1 -m pcb -m task_arithmetic -m ties 2>&1 \
      | tee "$OUT/speed-1b-cpu.txt"
    ;;
  *) echo "usage: bash benchmarks/device_check.sh gpu|cpu" >&2; exit 2 ;;
esac
