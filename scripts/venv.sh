#!/usr/bin/env bash
# Ensure the project's Python environment exists and print its path.
# The environment lives in a cache outside the repository, keyed by the lock file's hash, so torch (several GB)
# is installed once per cache and every later `make` reuses it. Installs pinned versions only: no resolving.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KUBETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}"
key="$(cat "$root/requirements.lock" | sha256sum | cut -c1-12)"
venv="$cache/venv-py311-$key"
if [[ -x "$venv/bin/python" && -f "$venv/.complete" ]]; then echo "$venv"; exit 0; fi
say() { printf '[venv %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
if ! command -v uv >/dev/null 2>&1; then
  say "installing uv"
  python3 -m pip install --quiet --disable-pip-version-check uv==0.13.8 >&2
fi
rm -rf "$venv"
mkdir -p "$cache"
say "creating $venv (first time only: torch and its CUDA libraries are several GB, allow 5-10 min)"
uv venv --quiet --python "$(command -v python3.11 || command -v python3)" "$venv" >&2
uv pip install --python "$venv/bin/python" --no-deps -r "$root/requirements.lock" >&2
touch "$venv/.complete"
say "ready"
echo "$venv"
