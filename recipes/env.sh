#!/usr/bin/env bash
# Run a command inside this project's Python environment, creating or
# updating that environment first when needed. Idempotent: a second run with
# the same pins checks them in about a second and installs nothing.
#
#   bash recipes/env.sh python -m recipes.pd_demo
#   bash recipes/env.sh python -m pytest -q
#
# SGLPD_VENV   where the environment lives (default ~/.cache/sgl-pd/venv; it is
#               shared by every clone, since a full sglang install is ~11 GB)
# SGLPD_PYTHON interpreter used to create it (default python3; needs 3.10+)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SGLPD_VENV:-$HOME/.cache/sgl-pd/venv}"
python="${SGLPD_PYTHON:-python3}"

# Mooncake's TCP transport (PD on CPU) links against the RDMA user libraries.
if ! ldconfig -p | grep 'libibverbs.so.1' > /dev/null; then  # not grep -q: SIGPIPE + pipefail
    echo "[env] installing libibverbs1 ibverbs-providers librdmacm1 (mooncake needs them)" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "[env] not root: run 'sudo apt-get install libibverbs1 ibverbs-providers librdmacm1' first" >&2
        exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 ibverbs-providers librdmacm1 >&2
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "[env] creating $venv" >&2
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

# The pins are the dependencies in pyproject.toml (with the cpu, test and
# bench extras); a stamp of their text says whether the venv already has them.
requirements="$("$venv/bin/python" - "$repo/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
print("\n".join(project["dependencies"] + extras["cpu"] + extras["test"] + extras["bench"]))
PY
)"
stamp="$venv/.sgl-pd-requirements"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$requirements" ]; then
    echo "[env] installing pinned dependencies into $venv (a fresh sglang install takes ~5 min, 11 GB)" >&2
    reqfile="$(mktemp)"
    printf '%s\n' "$requirements" > "$reqfile"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqfile" >&2
    rm -f "$reqfile"
    printf '%s' "$requirements" > "$stamp"
fi

cd "$repo"
export PATH="$venv/bin:$PATH"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
