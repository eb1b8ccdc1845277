#!/usr/bin/env bash
# Installs the third-party programs the test suite starts (as subprocesses on free
# loopback ports) when they are missing. Nothing is left running: each test starts
# and stops what it needs.
set -euo pipefail
need=()
# Filled in as the suite grows: redis-server, mosquitto, mosquitto-clients.
for prog in ${FISHCHAT_TEST_PROGRAMS:-}; do
  command -v "$prog" >/dev/null 2>&1 || need+=("$prog")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing test services: ${need[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}"
fi
