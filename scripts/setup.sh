#!/usr/bin/env bash
# Installs everything kamra needs on a Debian 12 host. Idempotent: safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

# iptables: CRIU saves and restores a container's own netfilter rules with iptables-save.
APT_PACKAGES=(busybox-static debootstrap zstd tar iproute2 procps util-linux python3 python3-venv
              lxcfs e2fsprogs iptables)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # kamra runs its own lxcfs per data root: keep the package from starting a host-wide
    # one (and other services) while installing.
    made_policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    [ -z "$made_policy" ] || rm -f /usr/sbin/policy-rc.d
fi

# Debian's own python3 starts in about 10 ms here, a third faster than others we saw;
# the CLI runs on every command, so its interpreter's start-up is part of kamra's speed.
PY=${PY:-/usr/bin/python3}
[ -x "$PY" ] || PY=python3
want="$("$PY" -c 'import sys; print(sys.base_prefix)')"
if [ -x .venv/bin/python ] && [ "$(.venv/bin/python -c 'import sys; print(sys.base_prefix)')" != "$want" ]; then
    echo "setup: recreating .venv on $PY"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'

# Byte-compile now: with PYTHONDONTWRITEBYTECODE set, every command would compile again.
.venv/bin/python -m compileall -q src >/dev/null

# kamra and kamrad on PATH for every shell. The kamra launcher is written by hand: pip's
# wrapper imports `re` (~10 ms) before kamra starts, and -I keeps the user's PYTHON*
# variables out of a root tool.
rm -f /usr/local/bin/kamra
cat > /usr/local/bin/kamra <<LAUNCHER
#!$PWD/.venv/bin/python -I
import sys
from kamra.cli.main import main
sys.exit(main())
LAUNCHER
chmod 755 /usr/local/bin/kamra
ln -sf "$PWD/.venv/bin/kamrad" /usr/local/bin/kamrad
# CRIU >= 4.2 (checkpoint/restore), proven with `criu check`; built once and cached if needed.
"$PY" scripts/install_criu.py
# CRIU's lazy pages (kamra migrate --lazy) need 4 MiB pipes; root without CAP_SYS_RESOURCE
# (some sandboxes) gets no pipe above fs.pipe-max-size, 1 MiB by default.
PIPE_MAX=4194304
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt "$PIPE_MAX" ]; then
    echo "fs.pipe-max-size = $PIPE_MAX" > /etc/sysctl.d/60-kamra.conf
    echo "$PIPE_MAX" > /proc/sys/fs/pipe-max-size
    echo "setup: fs.pipe-max-size raised to $PIPE_MAX for CRIU's lazy pages (/etc/sysctl.d/60-kamra.conf)"
fi
echo "setup: done (kamra $(.venv/bin/python -c 'import kamra; print(kamra.__version__)'))"
