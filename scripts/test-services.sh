#!/usr/bin/env bash
# Installs the third-party programs the test suite starts (as subprocesses on free
# loopback ports) when they are missing. Nothing is left running: each test starts
# and stops what it needs.
set -euo pipefail
# Program the tests start -> the Debian package that has it (when the names differ).
declare -A package_of=(
  [mosquitto_pub]=mosquitto-clients
  [mosquitto_sub]=mosquitto-clients
  [mosquitto_passwd]=mosquitto
)
need=()
# Daemons live in /usr/sbin, which is not on every user's PATH (the tests look there too).
for prog in ${FISHCHAT_TEST_PROGRAMS:-redis-server mosquitto mosquitto_passwd mosquitto_pub mosquitto_sub chromium}; do
  if ! command -v "$prog" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$prog" ]; then
    pkg="${package_of[$prog]:-$prog}"
    [[ " ${need[*]} " == *" $pkg "* ]] || need+=("$pkg")
  fi
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing test services: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}"
fi

# The MongoDB store tests talk to mongoeco's MongoDB-wire server (no mongod here), which
# needs Python >= 3.13: its own virtualenv, outside the work tree. Skipped when the
# tests are pointed at a real MongoDB (FISHCHAT_TEST_MONGO_URL).
mongoeco_venv="${FISHCHAT_MONGOECO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fishchat-iot/mongoeco-venv}"
if [ -z "${FISHCHAT_TEST_MONGO_URL:-}" ] \
  && ! "$mongoeco_venv/bin/python" -c 'import mongoeco.wire' >/dev/null 2>&1; then
  py313=""
  pyenv_root="$(pyenv root 2>/dev/null || true)"
  for cand in "${FISHCHAT_PYTHON313:-}" python3.13 python3.14 python3 \
    "$pyenv_root"/versions/3.1[3-9]*/bin/python3; do
    if [ -n "$cand" ] && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 13))' \
      >/dev/null 2>&1; then
      py313="$cand"
      break
    fi
  done
  if [ -z "$py313" ]; then
    echo "test-services: mongoeco needs Python >= 3.13 and none was found;" \
      "set FISHCHAT_PYTHON313=/path/to/python3.13 (or FISHCHAT_TEST_MONGO_URL)" >&2
    exit 1
  fi
  echo "installing mongoeco into $mongoeco_venv (with $py313)"
  rm -rf "$mongoeco_venv"
  "$py313" -m venv "$mongoeco_venv"
  "$mongoeco_venv/bin/pip" install -q --disable-pip-version-check 'mongoeco[wire]>=4.11,<5'
fi
