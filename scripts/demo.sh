#!/usr/bin/env bash
# make demo: build the busybox template, create and start a container, show it working.
# Uses its own data root under /tmp and removes everything it made at the end. It runs in
# a network namespace of its own, so the containers' veths, routes and firewall rules never
# touch this machine's network (kamrad networks containers in whatever namespace it runs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${KAMRA_DEMO_NETNS:-}" ]; then
    exec env KAMRA_DEMO_NETNS=1 unshare --net -- bash "$0" "$@"
fi
ip link set lo up
export KAMRA_ROOT="${KAMRA_ROOT:-$(mktemp -d /tmp/kamra-demo-XXXXXX)}"
kamra() { /usr/local/bin/kamra "$@"; }
step() { printf '\n\033[1m$ kamra %s\033[0m\n' "$*"; kamra "$@"; }
cleanup() {
    kamra destroy --force demo1 demo2 >/dev/null 2>&1 || true
    kamra daemon stop >/dev/null 2>&1 || true
    rm -rf "$KAMRA_ROOT"
}
trap cleanup EXIT

echo "kamra demo (data root: $KAMRA_ROOT)"
step template build busybox
step template list
step create demo1 --template busybox
step create demo2 --template busybox --ip 10.73.0.50 -c limits.memory=64M
step start demo1 demo2
step list
printf '\n\033[1m$ kamra exec demo1 -- sh -c "hostname; ps; ls /dev; cat /proc/self/cgroup"\033[0m\n'
kamra exec demo1 -- sh -c 'echo "hostname: $(hostname)"; ps; echo "/dev: $(ls /dev | tr "\n" " ")"; cat /proc/self/cgroup | head -3'
step ps demo1
printf '\n\033[1m$ kamra exec demo1 -- ping -c 2 10.73.0.50\033[0m\n'
kamra exec demo1 -- ping -c 2 10.73.0.50
step port add demo2 8080:80/tcp
kamra exec demo2 -- sh -c "setsid sh -c 'echo hello from demo2 | nc -l -p 80' </dev/null >/dev/null 2>&1 &"
sleep 0.3
printf '\n\033[1m$ busybox nc 127.0.0.1 8080\033[0m\n'
busybox nc 127.0.0.1 8080 </dev/null || true
step network show
printf "\n\033[1m$ kamra exec demo2 -- grep Mem /proc/meminfo   # its own 64M\033[0m\n"
kamra exec demo2 -- sh -c 'grep -E "MemTotal|MemFree" /proc/meminfo' 
printf '\n\033[1m$ echo "piped through the container" | kamra exec demo1 -- tr a-z A-Z\033[0m\n'
echo "piped through the container" | kamra exec demo1 -- tr a-z A-Z
printf '\n\033[1m$ time kamra run --rm busybox -- sh -c "echo one-shot; exit 3"\033[0m\n'
time (kamra run --rm busybox -- sh -c 'echo one-shot; exit 3' || echo "exit code: $?")
step stop demo1 demo2
step status demo1
step destroy demo1 demo2
echo
echo "Done. Try it yourself:  kamra --help"
