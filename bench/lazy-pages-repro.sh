#!/bin/sh
# Minimal reproduction of CRIU's remote lazy pages (post-copy) failing on this kernel,
# without kamra: a 64 MB process is dumped with --lazy-pages (the source keeps its memory
# and serves it), a lazy-pages daemon pulls from it and the restore runs with
# --lazy-pages, all over loopback in a private network namespace.
#
#   run as root:  unshare -n env PIPE_MAX=1048576 sh bench/lazy-pages-repro.sh
#                 unshare -n env PIPE_MAX=4194304 sh bench/lazy-pages-repro.sh
#   (without PIPE_MAX it runs with the sysctl as it is; make setup raises it to 4 MiB)
#
# Seen with CRIU 4.2.1 on kernel 6.18, as root without CAP_SYS_RESOURCE and with
# fs.pipe-max-size at its default 1 MiB: the source logs "page-pipe: tee: 65536:
# Operation not permitted" and "Lazy pages transfer FAILED" at the first page request;
# the lazy-pages daemon "Remote side closed connection"; the restore "uffd: Failed
# sending restore finished indication: Broken pipe" and kills what it restored.
# The cause: CRIU's lazy transfer asks for 4 MiB pipes (pipe_read_dest_init), which
# fs.pipe-max-size refuses without CAP_SYS_RESOURCE; CRIU goes on with 64 KiB pipes
# and its tee() of more comes back short. With PIPE_MAX=4194304 the sysctl is raised
# for the run (and put back at the end) and the restore completes without an error.
set -u
PATH=/usr/local/sbin:$PATH
ip link set lo up
if [ -n "${PIPE_MAX:-}" ]; then
    SAVED_PIPE_MAX=$(cat /proc/sys/fs/pipe-max-size)
    trap 'echo "$SAVED_PIPE_MAX" > /proc/sys/fs/pipe-max-size' EXIT
    echo "$PIPE_MAX" > /proc/sys/fs/pipe-max-size
fi
echo "fs.pipe-max-size: $(cat /proc/sys/fs/pipe-max-size)"
IMG=$(mktemp -d /tmp/lazy-pages-repro.XXXXXX)
# The process is pid 1 of its own pid namespace, so the restore (in a new one) can give
# it back its pid while the frozen source still exists.
unshare --pid --fork setsid python3 -c 'import os, time
b = bytearray(os.urandom(64 << 20))  # criu-lazy-marker
while True:
    time.sleep(0.05)' </dev/null >/dev/null 2>&1 &
HOLDER=$!
sleep 1
PID=$(pgrep -f "criu-lazy-marker" -P "$HOLDER" | head -1)
criu dump -t "$PID" -D "$IMG" --shell-job --lazy-pages --address 127.0.0.1 --port 27010 \
    -o dump.log -v4 &
DUMP=$!
while ! grep -q "page server on port" "$IMG/dump.log" 2>/dev/null && kill -0 $DUMP 2>/dev/null; do
    sleep 0.1
done
criu lazy-pages --page-server --address 127.0.0.1 --port 27010 -D "$IMG" -o lazy.log -v4 &
LAZY=$!
sleep 0.3
criu restore -D "$IMG" --shell-job --lazy-pages -d -o restore.log -v4
echo "restore exit status $?"
sleep 3
for p in $DUMP $LAZY; do kill "$p" 2>/dev/null; done
for log in dump lazy restore; do
    echo "== $log.log"
    grep -E "Error|FAILED" "$IMG/$log.log" | grep -v RLIMIT_NOFILE | tail -4
done
kill -9 "$HOLDER" $(pgrep -f "criu-lazy-marker") 2>/dev/null
wait 2>/dev/null
rm -rf "$IMG"
