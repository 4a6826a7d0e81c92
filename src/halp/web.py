"""What halp's web servers (`halp review`, `halp serve`) share: which hosts are loopback, and the listening socket.

A server binds to loopback unless told otherwise; each server decides what it asks for off loopback (a token,
an API key). Starlette and uvicorn are imported by the servers themselves, not here.
"""

from __future__ import annotations

import ipaddress
import socket

from halp.errors import HalpError

#: Host names a loopback server answers to (any other Host header may be a DNS-rebinding page).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int, error: type[HalpError]) -> socket.socket:
    """A listening socket on host:port; `error` (one line) when the port is taken or the host is not ours."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise error(f"--host {host}: cannot resolve it ({err.strerror})") from err
    family, kind, proto, _, address = infos[0]
    # The protocol must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say so, and without
    # it each small response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise error(f"port {port} on {host} is in use; choose another --port (0: any free)") from err
        raise error(f"cannot listen on {host}:{port}: {err.strerror}") from err
    return sock


def base_url(host: str, port: int) -> str:
    """http://HOST:PORT as a user on this machine (loopback) or elsewhere (a wildcard: this machine's name) types it."""
    shown = host if is_loopback(host) else (socket.gethostname() if host in ("0.0.0.0", "::") else host)
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}"
