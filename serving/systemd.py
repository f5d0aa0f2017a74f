"""The two systemd protocols the edge unit uses: socket activation and readiness notification.

- ``listen_fds()``: the listening sockets that systemd passed (``sd_listen_fds(3)``: ``LISTEN_PID``,
  ``LISTEN_FDS``, descriptors from 3). The edge's ``dualdeploy.socket`` owns the public port, so a
  release switch never closes it: the old and the new server accept from the same kernel queue while
  one drains and the other starts, and a connection that arrives between them waits in the queue
  instead of being refused.
- ``notify()``: ``sd_notify(3)`` over ``NOTIFY_SOCKET``, so ``systemctl start`` returns when the server is
  ready (``Type=notify``) and fails at once when it exits first.

Both are no-ops outside systemd, so the same server runs under supervisord, in a container or by hand.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("serving.systemd")

LISTEN_FDS_START = 3


def passed_fds(environ: MutableMapping[str, str] | None = None) -> int:
    """How many sockets systemd passed to this process (without taking them)."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return 0
    return int(count)


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets systemd passed to this process, or [] when none were passed to it.

    Unsets ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` (as ``sd_listen_fds(1)`` does) so that child
    processes don't take them for theirs.
    """
    env = os.environ if environ is None else environ
    count = passed_fds(env)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def notify(message: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to the service manager; False when there is none."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket: a leading NUL byte
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc)
        return False
    return True
