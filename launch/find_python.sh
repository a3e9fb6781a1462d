#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (JAX 0.11 and newer need it): the one named as the first
# argument (make's PYTHON=...), else python3.12, python3.13 or python3 on PATH if it runs and is new
# enough, else pyenv's newest 3.12 or 3.13. Exit 1 with one sentence on stderr when there is none.
if [[ -n ${1:-} ]]; then
  if "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    command -v "$1"
    exit 0
  fi
  echo "PYTHON=$1 is not a Python 3.12 or newer that runs; name another, or leave PYTHON unset" \
    "to let make find one." >&2
  exit 1
fi
for name in python3.12 python3.13 python3; do
  path=$(command -v "$name") || continue
  # pyenv's shims exist for versions that are not selected and fail when run: try each.
  if "$path" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    echo "$path"
    exit 0
  fi
done
if command -v pyenv >/dev/null; then
  for minor in 3.12 3.13; do
    version=$(pyenv versions --bare 2>/dev/null | grep -E "^${minor//./\\.}\.[0-9]+$" | sort -V | tail -n 1)
    [[ -n $version ]] || continue
    path="$(pyenv prefix "$version")/bin/python$minor"
    if [[ -x $path ]]; then
      echo "$path"
      exit 0
    fi
  done
fi
echo "lm needs Python 3.12 or newer and found none (python3.12, python3.13, python3, pyenv);" \
  "install one (e.g. pyenv install 3.12) or name it with PYTHON=/path/to/python3.12." >&2
exit 1
