#!/usr/bin/env bash
# Every check that needs the GPU machine, in one run (about 8 minutes): the gpu-marked
# tests, then the 0.95B family merged with --cuda and on the machine's 16 CPU cores.
# From the project root on this machine: ../shared/device/prepare.sh, then the device
# tool's run with carry [".device"], timeout_s 560 and the command
#   bash benchmarks/device_check.sh
# Results come back under $OUT (the tables are also printed).
set -uo pipefail
source .device/setup.sh || exit 1
OUT="${OUT:-/tmp/device-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
echo "cores: $(nproc)" | tee -a "$OUT/machine.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25 | tee "$OUT/gpu-tests.txt"
python3 benchmarks/speed.py --family 1b --cuda -r 2 2>&1 | tee "$OUT/speed-1b-cuda.txt"
python3 benchmarks/speed.py --family 1b -r 1 -m pcb -m task_arithmetic -m ties 2>&1 \
  | tee "$OUT/speed-1b-cpu.txt"
