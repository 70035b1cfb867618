#!/usr/bin/env bash
# Installs ApacheBench (ab), used by the load test and the README's `ab` example.
set -u
if command -v ab >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q apache2-utils >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q apache2-utils >/dev/null 2>&1; }
fi
if ! command -v ab >/dev/null 2>&1; then
  echo "warning: ApacheBench (ab) is not installed; install apache2-utils (e.g. sudo apt-get install apache2-utils)." >&2
  echo "         The ab load test will fail until it is." >&2
fi
exit 0
