#!/usr/bin/env bash
# Installs redis-server (Debian's package), used by the Redis job-store tests and the Ray Serve test.
set -u
if command -v redis-server >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q redis-server >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1; }
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "warning: redis-server is not installed; install it (e.g. sudo apt-get install redis-server)." >&2
  echo "         The Redis job-store and Ray Serve tests will fail until it is." >&2
fi
exit 0
