#!/usr/bin/env bash
# Installs everything kamra needs on a Debian 12 host. Idempotent: safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(busybox-static debootstrap zstd tar iproute2 procps util-linux)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PY:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

# kamra and kamrad on PATH for every shell.
for tool in kamra kamrad; do
    ln -sf "$PWD/.venv/bin/$tool" "/usr/local/bin/$tool"
done
echo "setup: done (kamra $(.venv/bin/python -c 'import kamra; print(kamra.__version__)'))"
