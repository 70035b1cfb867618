#!/usr/bin/env bash
# Installs Debian's chromium, which the browser tests (tests/browser/) drive through Playwright for Python.
# Playwright's own browser download needs the internet; the distribution's package does not.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }
fi
if ! command -v chromium >/dev/null 2>&1; then
  echo "warning: chromium is not installed; install it (e.g. sudo apt-get install chromium)." >&2
  echo "         The browser tests (tests/browser/) will fail until it is." >&2
fi
exit 0
