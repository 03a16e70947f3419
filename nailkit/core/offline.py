"""nailkit never reaches the network. One switch, ``NAILKIT_OFFLINE``, honoured by the package in every process.

* ``import nailkit`` sets ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1`` (unless ``NAILKIT_OFFLINE=0``): rfdetr's
  backbone code would ask the Hugging Face hub otherwise.
* With ``NAILKIT_OFFLINE=1``, ``import nailkit`` also installs a socket guard: connecting to, or resolving, anything
  but loopback raises ``NetworkAccessError`` (AF_UNIX and loopback stay allowed: papermill talks to its kernel over
  local ZMQ).
* ``python -m nailkit``, papermill kernels started by ``nailkit.core.notebooks.run_notebook`` and every child process
  (``nailkit.core.subproc.child_env``: conversion workers, fresh-process benchmarks, GPU delegate verdicts) get
  ``NAILKIT_OFFLINE=1`` unless it is set already, and they import nailkit, so they are guarded too. The test suite sets
  it in ``tests/conftest.py``.
"""

from __future__ import annotations

import ipaddress
import os
import socket

OFFLINE_ENV = {"NAILKIT_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class NetworkAccessError(RuntimeError):
    pass


def guard_requested() -> bool:
    return os.environ.get("NAILKIT_OFFLINE") == "1"


def _is_loopback(host) -> bool:
    if not isinstance(host, str):
        return False
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo


def _refuse(what: str) -> None:
    raise NetworkAccessError(f"nailkit works offline: refused to {what} (NAILKIT_OFFLINE=0 allows it)")


def _guard_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        _refuse(f"connect to {address!r}")
    return _real_connect(self, address)


def _guard_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
        _refuse(f"connect to {address!r}")
    return _real_connect_ex(self, address)


def _guard_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_loopback(host if isinstance(host, str) else None):
        _refuse(f"resolve {host!r}")
    return _real_getaddrinfo(host, *args, **kwargs)


def install() -> bool:
    """Apply the offline variables (unless ``NAILKIT_OFFLINE=0``) and, with ``NAILKIT_OFFLINE=1``, the socket guard.
    Returns whether the guard is on."""
    if os.environ.get("NAILKIT_OFFLINE") == "0":
        return False
    for k, v in OFFLINE_ENV.items():
        if k != "NAILKIT_OFFLINE":
            os.environ.setdefault(k, v)
    if not guard_requested():
        return False
    socket.socket.connect = _guard_connect
    socket.socket.connect_ex = _guard_connect_ex
    socket.getaddrinfo = _guard_getaddrinfo
    return True


def activate() -> bool:
    """Request the guard for this process and its children (``NAILKIT_OFFLINE=1`` unless set), then ``install``."""
    os.environ.setdefault("NAILKIT_OFFLINE", "1")
    return install()
