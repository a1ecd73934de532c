"""Small network helpers shared by the server, the ray backend and tensor-parallel ranks."""
from __future__ import annotations

import socket


def free_port(host: str) -> int:
    """A TCP port free on `host` (IPv4 or IPv6) now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def tcp_url(host: str, port: int) -> str:
    """`tcp://host:port`, an IPv6 host in brackets.

    >>> tcp_url("127.0.0.1", 29500), tcp_url("::1", 29500)
    ('tcp://127.0.0.1:29500', 'tcp://[::1]:29500')
    """
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
