#!/usr/bin/env bash
# Every check that needs the GPU machine, as three prepared runs that each fit one device
# call. Measured on 2026-12-04 (one H200, 16 cores): `gpu` (the gpu-marked tests, 196 s, then
# the 0.95B family built and merged with --cuda, 2 repeats, ~220 s) about 7 minutes;
# `search` (the search's start-up and candidate merges with device: cuda) about 1.5 minutes;
# `cpu` (the same family on the 16 CPU cores, one run each, ~200 s) about 4 minutes. A
# session has 15 minutes of device time in all, the machine's start included: run `gpu`
# with timeout_s 480, then at once (the machine stays warm for 30 s and keeps the built
# models) `cpu` and `search` in one call with timeout_s 360. From the project root on this
# machine run ../shared/device/prepare.sh, then the device tool with carry [".device"] and
# the command `bash benchmarks/device_check.sh gpu` (then `... cpu; bash ... search`).
# Results come back under $OUT (full logs; the tables are also printed).
set -uo pipefail
PART="${1:-gpu}"
source .device/setup.sh || exit 1
OUT="${OUT:-/tmp/device-check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
echo "cores: $(nproc)" | tee -a "$OUT/machine.txt"
case "$PART" in
  gpu)
    # The whole log comes back (failures' details were cut by a tail before); the summary prints.
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/ >"$OUT/gpu-tests.txt" 2>&1
    tail -8 "$OUT/gpu-tests.txt"
    python3 benchmarks/speed.py --family 1b --cuda -r 2 2>&1 | tee "$OUT/speed-1b-cuda.txt"
    ;;
  search)
    python3 benchmarks/evolve_speed.py --family 1b --device cuda 2>&1 | tee "$OUT/evolve-1b-cuda.txt"
    ;;
  cpu)
    python3 benchmarks/speed.py --family 1b -r 1 -m pcb -m task_arithmetic -m ties 2>&1 \
      | tee "$OUT/speed-1b-cpu.txt"
    ;;
  *) echo "usage: bash benchmarks/device_check.sh gpu|cpu|search" >&2; exit 2 ;;
esac
