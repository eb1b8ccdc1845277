#!/usr/bin/env bash
# The seed's distributed deployment on this machine (docs/deploy-distributed.md):
#   scripts/cluster.sh start   Redis (if none on 6379), MongoDB (if none on 27017),
#                              then gateway, two msg_servers, router, manager, monitor
#   scripts/cluster.sh stop    stops what start started
#   scripts/cluster.sh status  which roles run
# Logs: data/cluster/logs/ROLE.log. Roles are started in the background with their
# config from configs/; each waits for Redis and MongoDB, so the order does not matter.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
DIR=data/cluster
LOGS=$DIR/logs
PIDS=$DIR/pids
ROLES="gateway:gateway msg-server:msg_server.19000 msg-server:msg_server.19001 router:router manager:manager monitor:monitor"
mkdir -p "$LOGS" "$PIDS"

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_redis() {
  if listening 6379; then echo "redis     already on 127.0.0.1:6379"; return; fi
  command -v redis-server >/dev/null || { echo "error: redis-server is not installed: apt-get install redis-server (or run scripts/test-services.sh)" >&2; exit 1; }
  mkdir -p "$DIR/redis"
  redis-server --port 6379 --bind 127.0.0.1 --dir "$PWD/$DIR/redis" --appendonly yes \
    --appendfsync always --save '' --daemonize yes --pidfile "$PWD/$PIDS/redis.pid" \
    --logfile "$PWD/$LOGS/redis.log"
  echo "redis     started on 127.0.0.1:6379 (append-only file in $DIR/redis)"
}

start_mongo() {
  if listening 27017; then echo "mongodb   already on 127.0.0.1:27017"; return; fi
  if command -v mongod >/dev/null; then
    mkdir -p "$DIR/mongo"
    mongod --bind_ip 127.0.0.1 --port 27017 --dbpath "$PWD/$DIR/mongo" --fork \
      --logpath "$PWD/$LOGS/mongod.log" --pidfilepath "$PWD/$PIDS/mongo.pid" >/dev/null
    echo "mongodb   started on 127.0.0.1:27017 (data in $DIR/mongo)"
    return
  fi
  local venv=${FISHCHAT_MONGOECO_VENV:-$HOME/.cache/fishchat-iot/mongoeco-venv}
  if [ ! -x "$venv/bin/python" ]; then
    echo "error: no MongoDB on 127.0.0.1:27017 and no mongod to start: install MongoDB, or run scripts/test-services.sh for the in-memory test server" >&2
    exit 1
  fi
  echo "mongodb   none installed: starting mongoeco, an IN-MEMORY test server (data is lost when it stops)"
  nohup "$venv/bin/python" -c '
import asyncio, signal
from mongoeco.wire import AsyncMongoEcoProxyServer
async def main():
    async with AsyncMongoEcoProxyServer(host="127.0.0.1", port=27017):
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
asyncio.run(main())' >"$LOGS/mongoeco.log" 2>&1 &
  echo $! >"$PIDS/mongo.pid"
}

start() {
  start_redis
  start_mongo
  for entry in $ROLES; do
    role=${entry%%:*}; name=${entry#*:}
    if [ -f "$PIDS/$name.pid" ] && kill -0 "$(cat "$PIDS/$name.pid")" 2>/dev/null; then
      echo "$name already running"; continue
    fi
    nohup "$BIN/fishchat-iot" --config "configs/$name.toml" run "$role" >"$LOGS/$name.out" 2>"$LOGS/$name.log" &
    echo $! >"$PIDS/$name.pid"
    echo "$name starting (log: $LOGS/$name.log)"
  done
  echo
  echo "devices: gateway 127.0.0.1:17000 (or msg_servers 127.0.0.1:19000, 127.0.0.1:19001)"
  echo "monitor: http://127.0.0.1:30000/ (fishchat-iot --config configs/monitor.toml operator add NAME)"
  echo "register: fishchat-iot --config configs/manager.toml device register ID"
}

stop() {
  for entry in $ROLES; do
    name=${entry#*:}
    [ -f "$PIDS/$name.pid" ] || continue
    kill "$(cat "$PIDS/$name.pid")" 2>/dev/null && echo "$name stopped" || true
    rm -f "$PIDS/$name.pid"
  done
  for svc in mongo redis; do
    [ -f "$PIDS/$svc.pid" ] || continue
    kill "$(cat "$PIDS/$svc.pid")" 2>/dev/null && echo "$svc stopped" || true
    rm -f "$PIDS/$svc.pid"
  done
}

status() {
  for entry in $ROLES; do
    name=${entry#*:}
    if [ -f "$PIDS/$name.pid" ] && kill -0 "$(cat "$PIDS/$name.pid")" 2>/dev/null; then
      echo "$name running (pid $(cat "$PIDS/$name.pid"))"
    else
      echo "$name not running"
    fi
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
