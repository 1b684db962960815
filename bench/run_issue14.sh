#!/usr/bin/env bash
# Every row of issues 14 and 27, baseline in the same run, at 5 MiB and 1 GiB (4 GiB with --big),
# with 1 torch thread and with the default, medians of --repeats fresh processes, peak RSS and CPU seconds.
#
#   bench/run_issue14.sh [--repeats 5] [--dir /tmp] [--sizes "5 1024"] [--big] [--only "save convert"]
#
# Rows -> scripts: cold start (import, inspect, scan of a small file, --help; the first torchckpt.load vs the
# first torch.load in a process that imported torch) -> bench_startup.py (once, not per
# size); load_into meta/safetensors/zip -> bench_load_into.py; torchckpt.save, sync and async
# Checkpointer.save (issue 27: also at 64 and 512 MiB and 2 GiB with --cases core) -> bench_save.py;
# diff --values -> bench_diff.py; convert legacy -> bench_convert.py; 8 shards read by 1 and 2 threads
# -> bench_shards.py.
# Needs free disk of about 4x the size (load_into writes zip, legacy and safetensors copies) and RAM of
# about 3x. Run on a quiet machine: each case is timed in its own fresh process, one at a time.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
repeats=5 dir="" sizes="5 1024" only="startup load_into save convert diff shards"
while [ $# -gt 0 ]; do
  case "$1" in
    --repeats) repeats="$2"; shift 2 ;;
    --dir) dir="$2"; shift 2 ;;
    --sizes) sizes="$2"; shift 2 ;;
    --big) sizes="$sizes 4096"; shift ;;
    --only) only="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cd "$here"
# pip byte-compiles an installed package; a source tree under PYTHONDONTWRITEBYTECODE=1 would compile its
# modules again in every measured process (~70 ms of a first load)
python3 -m compileall -q "$here/../src" >/dev/null
python3 -c "import torch, safetensors; print('torch', torch.__version__, 'safetensors', safetensors.__version__)"
nproc; uname -r; uptime
if [[ " $only " == *" startup "* ]]; then
  echo
  echo "=== bench_startup.py --repeats $((repeats * 2))"
  python3 bench_startup.py --repeats $((repeats * 2))
fi
for size in $sizes; do
  for threads in 1 0; do
    for bench in $only; do
      [ "$bench" = startup ] && continue
      echo
      echo "=== bench_$bench.py --size-mib $size --threads $threads (0: default) --repeats $repeats"
      python3 "bench_$bench.py" --size-mib "$size" --repeats "$repeats" --threads "$threads" ${dir:+--dir "$dir"}
    done
  done
done
