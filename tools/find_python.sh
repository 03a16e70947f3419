#!/usr/bin/env bash
# Print the path of a working Python 3.12 interpreter.
# Order: $PYTHON (if set), python3.12 on PATH (if it actually runs), pyenv's 3.12.x.
# On our machines the pyenv shim `python3.12` exists but fails unless PYENV_VERSION is set,
# so every candidate is *run* before it is accepted.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  if ok "$PYTHON"; then command -v "$PYTHON"; exit 0; fi
  echo "PYTHON=$PYTHON is not a working Python 3.12 interpreter" >&2; exit 1
fi
if command -v python3.12 >/dev/null 2>&1 && ok python3.12; then
  python3.12 -c 'import sys; print(sys.executable)'; exit 0
fi
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for p in $(ls -d "$root"/versions/3.12.*/bin/python3 2>/dev/null | sort -V -r); do
  if ok "$p"; then echo "$p"; exit 0; fi
done
echo "No Python 3.12 found. Install it (e.g. 'pyenv install 3.12') or run 'make PYTHON=/path/to/python3.12 ...'" >&2
exit 1
