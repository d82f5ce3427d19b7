#!/usr/bin/env bash
# Create ./.venv (if missing) and install ms_nlp_compress into it with the given extras (default: test).
# Idempotent: reinstalls only when setup.py changed. Usage: source-free, prints the venv path on success.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MSNC_VENV:-$ROOT/.venv}"
EXTRAS="${1:-test}"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi
if [ -z "$PYTHON" ]; then echo "setup_env: no python3.11 or python3 on PATH" >&2; exit 1; fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 9) <= sys.version_info[:2] <= (3, 11) else 1)'; then
  echo "setup_env: $("$PYTHON" --version) found; MindSpore 2.9/2.10 wheels need Python 3.9-3.11 (3.11 tested)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/tmp/msnc_venv_err.txt; then
    # Debian splits venv/ensurepip into a separate package.
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup_env: installing Debian's venv package"
      apt-get update -qq && apt-get install -y -qq "python3-venv" >/dev/null || true
      V="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      apt-get install -y -qq "python${V}-venv" >/dev/null 2>&1 || true
      rm -rf "$VENV"
      "$PYTHON" -m venv "$VENV"
    else
      cat /tmp/msnc_venv_err.txt >&2
      echo "setup_env: '$PYTHON -m venv' failed; on Debian run: sudo apt-get install python3-venv" >&2
      exit 1
    fi
  fi
fi
STAMP="$VENV/.msnc-installed-$EXTRAS"
HASH="$(cat "$ROOT/setup.py" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]"
  echo "$HASH" > "$STAMP"
fi
echo "$VENV"
