"""kamrad entry point: one daemon per data root, killable at any instant."""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import threading

from kamra import scratch
from kamra.errors import KamraError
from kamra.paths import Layout, default_root, remove_files, write_pid_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kamrad", description="kamra's daemon")
    parser.add_argument("--root", default=default_root(), help="data root (default: %(default)s)")
    parser.add_argument("--debug", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s kamrad[%(process)d] %(levelname)s %(message)s")
    layout = Layout.at(args.root)
    layout.ensure()
    lock_fd = os.open(os.path.join(layout.run, "kamrad.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                      0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"kamrad: another kamrad already serves {layout.root}", file=sys.stderr)
        return 1
    # Imported late: the engine pulls in more than a failed start needs.
    from kamra.daemon.server import UnixHTTPServer
    from kamra.engine import Host

    try:
        host = Host(layout.root)
    except KamraError as exc:
        print(f"kamrad: {exc.message}", file=sys.stderr)
        return 1
    # Builds and imports that a crash interrupted left scratch dirs: none runs yet.
    for leftover in (host.templates.cleanup_scratch() + host.migrations.cleanup_incoming()
                     + scratch.sweep(layout.root_id)):
        logging.info("removed unfinished work %s", leftover)
    try:
        host.listen()  # for other kamra hosts, if an address was configured
    except KamraError as exc:
        logging.error("%s", exc.message)
    server = UnixHTTPServer(layout.daemon_socket, host)
    write_pid_file(layout.daemon_pid)
    # Migrations whose end this host did not hear: ask their targets.
    threading.Thread(target=host.migrations.settle_pending,
                     args=(server.shutdown_requested,), name="kamra-settle",
                     daemon=True).start()

    def stop(*_: object) -> None:
        server.shutdown_requested.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                               daemon=True)
    serving.start()
    logging.info("serving %s", layout.root)
    while not server.shutdown_requested.wait(1):
        pass
    server.shutdown()
    server.server_close()
    remove_files(layout.daemon_socket, layout.daemon_pid)
    # The keeper stays while containers run (they must outlive kamrad); an idle one goes.
    host.shutting_down()
    try:
        host.keeper.request({"op": "shutdown"}, timeout=5)
    except (OSError, KamraError):
        pass
    host.cgroups.cleanup()
    host.close()
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
