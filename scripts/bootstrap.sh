#!/usr/bin/env bash
# Creates .venv with a Python 3.10 interpreter, installs cipherfeed and generates the gRPC code.
# The openfhe wheel only imports on CPython 3.10 here, so any other version is refused.
# Choose the interpreter with CIPHERFEED_PYTHON=/path/to/python3.10; otherwise python3.10 on
# PATH, then pyenv's 3.10 builds, then /usr/bin/python3.10 are tried in that order.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"

is_py310() { [ -x "$1" ] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; }

find_python() {
  local c
  if [ -n "${CIPHERFEED_PYTHON:-}" ]; then
    is_py310 "$CIPHERFEED_PYTHON" && { echo "$CIPHERFEED_PYTHON"; return; }
    echo "bootstrap: CIPHERFEED_PYTHON=$CIPHERFEED_PYTHON is not a working CPython 3.10" >&2
    return 1
  fi
  c=$(command -v python3.10 2>/dev/null || true)
  if [ -n "$c" ] && is_py310 "$c"; then echo "$c"; return; fi
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.10(\.[0-9]+)?$' | sort -t. -k3 -n -r); do
      c="$(pyenv prefix "$v" 2>/dev/null)/bin/python3.10"
      if is_py310 "$c"; then echo "$c"; return; fi
    done
  fi
  for c in "$HOME"/.pyenv/versions/3.10*/bin/python3.10 /usr/local/bin/python3.10 /usr/bin/python3.10; do
    if is_py310 "$c"; then echo "$c"; return; fi
  done
  cat >&2 <<MSG
bootstrap: no CPython 3.10 found.
  cipherfeed needs Python 3.10: the openfhe wheel fails to import on 3.11 and needs a newer
  libstdc++ on 3.12. Install 3.10 (e.g. 'pyenv install 3.10.13') or point
  CIPHERFEED_PYTHON at a python3.10 binary.
MSG
  return 1
}

if [ -x .venv/bin/python ] && ! is_py310 .venv/bin/python; then
  echo "bootstrap: .venv is not Python 3.10; recreating it" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "bootstrap: creating .venv with $py" >&2
  "$py" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi

stamp=".venv/.cipherfeed-installed-$extras-$(cat pyproject.toml cipherfeed/he/_rnsmac.c | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing cipherfeed[$extras] (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --progress-bar off -e ".[$extras]"
  touch "$stamp"
  if ! ls cipherfeed/he/_rnsmac.*.so >/dev/null 2>&1; then
    echo "bootstrap: the scoring kernel (cipherfeed/he/_rnsmac.c) was not compiled: no C compiler?" >&2
    echo "  cipherfeed works without it, with OpenFHE's own products (about 2x slower scoring)." >&2
  fi
fi
.venv/bin/python scripts/gen_protos.py

# anvil (a real Ethereum node) for the ledger's tests: the npm package carries the binary.
ANVIL_VERSION=1.7.1
if [ "$extras" != "prod" ] && [ ! -x .tools/node_modules/.bin/anvil ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "bootstrap: installing anvil $ANVIL_VERSION from npm into .tools/" >&2
    npm install --prefix .tools --no-audit --no-fund --loglevel=error "@foundry-rs/anvil@$ANVIL_VERSION" >&2
  else
    echo "bootstrap: npm not found; the anvil tests will fail (install Node.js/npm)" >&2
  fi
fi
# MovieLens-100k (never committed: its terms forbid redistribution) from the recbole wheel, digest-checked.
if [ "$extras" != "prod" ] && [ ! -f .tools/datasets/recbole-1.2.1-py3-none-any.whl ]; then
  .venv/bin/python -m services.recommender.catalogues.movielens fetch >&2 \
    || echo "bootstrap: MovieLens-100k not fetched; the MovieLens tests will be skipped" >&2
fi
# Chromium for the pages' browser tests (tests/test_pages*.py): Debian's package, driven by
# playwright with executable_path=/usr/bin/chromium (playwright's own browser downloads are never used).
if [ "$extras" = "dev" ] && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing Debian's chromium for the browser tests" >&2
    { apt-get install -y --no-install-recommends chromium \
      || { apt-get update && apt-get install -y --no-install-recommends chromium; }; } >&2 \
      || echo "bootstrap: apt-get could not install chromium; tests/test_pages*.py will fail" >&2
  else
    echo "bootstrap: /usr/bin/chromium is missing; tests/test_pages*.py need it:" >&2
    echo "  as root run 'apt-get install -y --no-install-recommends chromium' (Debian's package)" >&2
  fi
fi
