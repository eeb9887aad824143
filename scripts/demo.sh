#!/usr/bin/env bash
# make demo: build the busybox template, create and start a container, show it working.
# Uses its own data root under /tmp and removes everything it made at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export KAMRA_ROOT="${KAMRA_ROOT:-$(mktemp -d /tmp/kamra-demo-XXXXXX)}"
kamra() { /usr/local/bin/kamra "$@"; }
step() { printf '\n\033[1m$ kamra %s\033[0m\n' "$*"; kamra "$@"; }
cleanup() {
    kamra destroy --force demo1 >/dev/null 2>&1 || true
    kamra daemon stop >/dev/null 2>&1 || true
    rm -rf "$KAMRA_ROOT"
}
trap cleanup EXIT

echo "kamra demo (data root: $KAMRA_ROOT)"
step template build busybox
step template list
step create demo1 --template busybox
step start demo1
step list
printf '\n\033[1m$ kamra exec demo1 -- sh -c "hostname; ps; ls /dev; cat /proc/self/cgroup"\033[0m\n'
kamra exec demo1 -- sh -c 'echo "hostname: $(hostname)"; ps; echo "/dev: $(ls /dev | tr "\n" " ")"; cat /proc/self/cgroup | head -3'
step ps demo1
printf '\n\033[1m$ echo "piped through the container" | kamra exec demo1 -- tr a-z A-Z\033[0m\n'
echo "piped through the container" | kamra exec demo1 -- tr a-z A-Z
printf '\n\033[1m$ time kamra run --rm busybox -- sh -c "echo one-shot; exit 3"\033[0m\n'
time (kamra run --rm busybox -- sh -c 'echo one-shot; exit 3' || echo "exit code: $?")
step stop demo1
step status demo1
step destroy demo1
echo
echo "Done. Try it yourself:  kamra --help"
