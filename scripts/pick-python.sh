#!/usr/bin/env bash
# Prints the interpreter `make` builds the venv with: of the Python 3.11+ found here that
# can make a venv, the one that runs a gateway-like workload fastest.
#
# Why: the same CPython version runs the gateway ~20 % faster (and Mosquitto's ratios
# with it) when built with PGO and LTO, as distributions and python.org's images build
# it, than as a default source build (pyenv's, for one). Measured here: Debian's 3.11.2
# 8.6 us per message in the hot path against 10.4 for pyenv's 3.11.7
# (docs/benchmarks.md, "The interpreter"). Set PYTHON=... to choose yourself.
set -uo pipefail

candidates=(python3 /usr/bin/python3 /usr/local/bin/python3)

# A few ms of what the gateway does per message: a dict of in-flight ids, str building,
# bytearray appends, calls. Best of 5, in ms.
probe='
import sys, time, venv, ensurepip
if sys.version_info < (3, 11):
    sys.exit(1)
def work(n):
    inflight = {}
    out = bytearray()
    for i in range(n):
        key = f"m{i}"
        inflight[key] = (key, i)
        if len(inflight) > 64:
            inflight.pop(f"m{i - 64}")
        out += key.encode()
        if len(out) > 4096:
            out.clear()
best = min(
    (lambda t0: (work(60000), time.perf_counter() - t0)[1])(time.perf_counter())
    for _ in range(5)
)
print(f"{best * 1000:.2f} {sys.executable} {sys.version.split()[0]}")
'

best_ms=""
best_exe=""
report=()
seen=" "
for c in "${candidates[@]}"; do
  command -v "$c" >/dev/null 2>&1 || continue
  line=$("$c" -c "$probe" 2>/dev/null) || continue
  read -r ms exe version <<<"$line"
  real=$(readlink -f "$exe")
  [[ "$seen" == *" $real "* ]] && continue
  seen+="$real "
  report+=("$exe ($version): ${ms} ms")
  if [ -z "$best_ms" ] || awk -v a="$ms" -v b="$best_ms" 'BEGIN { exit !(a < b) }'; then
    best_ms=$ms
    best_exe=$exe
  fi
done

if [ -z "$best_exe" ]; then
  echo "no Python 3.11 or newer with the venv module found: install one (Debian:" \
    "apt-get install python3 python3-venv) or set PYTHON=..." >&2
  exit 1
fi
echo "interpreter for the venv: $best_exe (probe, lower is faster: $(IFS=';'; echo "${report[*]}"))" >&2
echo "$best_exe"
