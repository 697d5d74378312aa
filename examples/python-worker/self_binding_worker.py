#!/usr/bin/env python3
"""Echo worker in Python that binds its own UDP socket(s), as most services do.

It knows nothing of the supervisor's socket handoff: no LISTEN_FDS, no
LISTEN_PID. It creates a socket, sets the options it wants, binds the address
it is told, and sends READY=1 to NOTIFY_SOCKET (a filesystem path, the way
systemd gives it) once everything is bound. Under the supervisor with
handoff = "bind", every bind() to a listener's address is answered with the
supervisor's own socket; run by hand it just binds.

Replies follow the echo protocol (docs/echo-protocol.md): the request, then
generation (u32 LE), worker (u16 LE) and socket index (u16 LE); the
generation and worker come from SUPERVISOR_GENERATION / SUPERVISOR_WORKER
when set (0 otherwise: they only label the replies).

Options, for the tests:
  --address HOST:PORT   what to bind (IPv6 as [::1]:5300)
  --threads N           N sockets bound to the same address, one per thread
  --pktinfo             IP_PKTINFO / IPV6_RECVPKTINFO before bind(); each
                        datagram's destination address is then read from it
  --rcvbuf BYTES        SO_RCVBUF before bind()
  --tcp                 also bind and listen on TCP at the same port, with
                        SO_REUSEPORT (accepts, answers "tcp ok", closes)
  --report DIR          write DIR/<pid>.json: what was in effect after bind()
  --rebind              bind, close the socket, and bind a new one again
  --user NAME           drop to this user after binding (started as root)
  --bind-in-child       fork first: a child binds, serves and says READY=1; the
                        parent waits (and passes SIGTERM on)

SIGTERM keeps its default action (dies at once), like echo_worker.py.
Standard library only.
"""

import argparse
import json
import os
import pwd
import signal
import socket
import struct
import sys
import threading

MAX_DATAGRAM = 65536
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
SO_RCVBUFFORCE = 33


def parse_address(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def notify(state):
    """sd_notify: one datagram to the unix socket NOTIFY_SOCKET names."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


def make_socket(family, address, args):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if args.pktinfo:
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
    if args.rcvbuf:
        # As DNS servers do (unbound's so-rcvbuf): SO_RCVBUF is capped at
        # net.core.rmem_max, SO_RCVBUFFORCE (root) is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 2 * args.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, args.rcvbuf)
    sock.bind(address)
    return sock


def effective(sock, family, args):
    """What the bound socket really has (the options must have carried over)."""
    report = {
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
        "bound": list(sock.getsockname()[:2]),
    }
    if family == socket.AF_INET:
        report["pktinfo"] = sock.getsockopt(socket.IPPROTO_IP, IP_PKTINFO)
    else:
        report["pktinfo"] = sock.getsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO)
    return report


def serve(sock, trailer, args, seen_pktinfo):
    cmsg_space = socket.CMSG_SPACE(32) if args.pktinfo else 0
    while True:
        try:
            data, ancillary, _flags, peer = sock.recvmsg(MAX_DATAGRAM, cmsg_space)
        except OSError:
            return
        if args.pktinfo:
            for level, kind, _payload in ancillary:
                if (level, kind) in ((socket.IPPROTO_IP, IP_PKTINFO),
                                     (socket.IPPROTO_IPV6, IPV6_PKTINFO)):
                    seen_pktinfo.set()
        try:
            sock.sendto(data + trailer, peer)
        except OSError:
            pass


def serve_tcp(listener):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.sendall(b"tcp ok\n")
        conn.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default="127.0.0.1:5300")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pktinfo", action="store_true")
    parser.add_argument("--rcvbuf", type=int, default=0)
    parser.add_argument("--tcp", action="store_true")
    parser.add_argument("--report")
    parser.add_argument("--rebind", action="store_true")
    parser.add_argument("--user")
    parser.add_argument("--bind-in-child", action="store_true")
    args = parser.parse_args()

    if args.bind_in_child:
        child = os.fork()
        if child:
            signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
            while True:
                try:
                    _, status = os.waitpid(child, 0)
                    sys.exit(os.waitstatus_to_exitcode(status))
                except InterruptedError:
                    continue

    generation = int(os.environ.get("SUPERVISOR_GENERATION", "0"))
    worker = int(os.environ.get("SUPERVISOR_WORKER", "0"))
    family, address = parse_address(args.address)

    # Each thread creates and binds its own socket, as a thread-per-socket
    # server does; the main thread waits for all of them before READY=1.
    sockets = [None] * args.threads
    errors = []

    def bind_one(i):
        try:
            if args.rebind:
                make_socket(family, address, args).close()
            sockets[i] = make_socket(family, address, args)
        except OSError as e:
            errors.append(f"socket {i}: {e}")

    binders = [threading.Thread(target=bind_one, args=(i,)) for i in range(args.threads)]
    for t in binders:
        t.start()
    for t in binders:
        t.join()
    if errors:
        sys.exit("self_binding_worker.py: " + "; ".join(errors))

    tcp = None
    if args.tcp:
        tcp = socket.socket(family, socket.SOCK_STREAM)
        # Several workers (and generations) listen on the port at once.
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        tcp.bind(address)
        tcp.listen(16)
        threading.Thread(target=serve_tcp, args=(tcp,), daemon=True).start()

    if args.user:
        user = pwd.getpwnam(args.user)
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    seen_pktinfo = threading.Event()
    for index, sock in enumerate(sockets):
        trailer = struct.pack("<IHH", generation, worker, index)
        threading.Thread(target=serve, args=(sock, trailer, args, seen_pktinfo),
                         daemon=True).start()

    report = {"sockets": [effective(s, family, args) for s in sockets],
              "tcp": tcp is not None}
    notify("READY=1")
    if args.report:
        path = os.path.join(args.report, f"{os.getpid()}.json")
        if args.pktinfo:
            # Written again once a datagram arrived with its destination address.
            write_report(path, report)
            seen_pktinfo.wait()
            report["pktinfo_seen"] = True
        write_report(path, report)
    threading.Event().wait()


def write_report(path, report):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.rename(tmp, path)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
