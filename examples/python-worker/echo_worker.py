#!/usr/bin/env python3
"""Echo worker in Python that speaks only the socket-activation protocol.

It shows that the supervisor runs any program that understands systemd's
socket activation, with no supervisor-specific library:

* the sockets are fds 3 .. 3+LISTEN_FDS-1, meant for us only if
  LISTEN_PID is our own pid (environment variables are inherited by every
  descendant; LISTEN_PID says which process the fds are for);
* readiness is "READY=1" sent as one datagram to the unix socket named by
  NOTIFY_SOCKET (a path, or an abstract name written with a leading '@');
* it does not drain: SIGTERM keeps its default action and kills it at once.
  The supervisor handles such workers by waiting until the old sockets'
  receive queues are empty before sending the signal, so nothing is lost.

Replies follow the echo protocol (docs/echo-protocol.md): the request bytes,
then an 8-byte trailer: generation (u32 LE), worker (u16 LE), and the index
of the receiving socket among our sockets of that name (u16 LE).

Standard library only.
"""

import os
import selectors
import socket
import struct
import sys

FIRST_FD = 3  # 0, 1 and 2 are stdin, stdout and stderr
MAX_DATAGRAM = 65536
# Datagrams served from one socket per wake-up: fewer system calls than one
# select() per datagram, and small enough that a flooded socket cannot starve
# the others.
BATCH = 64


def inherited_sockets():
    """Returns [(name, index within name, socket)] from LISTEN_*; exits if none."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("echo_worker.py: not socket-activated (LISTEN_PID is not our pid); "
                 "run it under the supervisor or systemd")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "")
    names = names.split(":") if names else ["unknown"] * count
    if len(names) != count:
        sys.exit(f"echo_worker.py: LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")
    if count == 0:
        sys.exit("echo_worker.py: LISTEN_FDS=0: nothing to serve")

    sockets = []
    seen = {}
    for offset, name in enumerate(names):
        # socket.socket(fileno=...) adopts the fd and detects family and type.
        sock = socket.socket(fileno=FIRST_FD + offset)
        if sock.type != socket.SOCK_DGRAM:
            sys.exit(f"echo_worker.py: fd {FIRST_FD + offset} ({name}) is not a datagram socket")
        # Python creates and adopts fds non-inheritable, but make it explicit:
        # these sockets must not leak into anything we might start.
        sock.set_inheritable(False)
        sock.setblocking(False)
        index = seen.get(name, 0)
        seen[name] = index + 1
        sockets.append((name, index, sock))
    # Like sd_listen_fds(unset_environment=1): our children are not the target.
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return sockets


def notify(state):
    """Sends one sd_notify message; does nothing if NOTIFY_SOCKET is unset."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        # Abstract namespace: '@' stands for the leading NUL byte.
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def main():
    generation = int(os.environ.get("SUPERVISOR_GENERATION", "0"))
    worker = int(os.environ.get("SUPERVISOR_WORKER", "0"))

    selector = selectors.DefaultSelector()
    for _name, index, sock in inherited_sockets():
        trailer = struct.pack("<IHH", generation, worker, index)
        selector.register(sock, selectors.EVENT_READ, trailer)

    notify("READY=1")

    buffer = bytearray(MAX_DATAGRAM)
    view = memoryview(buffer)
    while True:
        for key, _events in selector.select():
            sock, trailer = key.fileobj, key.data
            for _ in range(BATCH):
                try:
                    length, peer = sock.recvfrom_into(buffer)
                except BlockingIOError:
                    break
                try:
                    # Scatter-gather: request and trailer go out as one
                    # datagram without being copied together first.
                    sock.sendmsg([view[:length], trailer], [], 0, peer)
                except OSError:
                    pass  # one unreachable peer is not our failure


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Ctrl-C when run by hand; SIGTERM is left at its default (exit at once).
        sys.exit(130)
