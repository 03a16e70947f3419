"""Shared fixtures. Every test runs under a socket guard: any attempt to open a network connection fails the test.
(AF_UNIX sockets stay allowed: Jupyter kernels under papermill talk over local ZMQ/TCP on loopback only.)"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class NetworkAccessError(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
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


def _guard_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to connect to {address!r}; nailkit must work offline")
    return _real_connect(self, address)


def _guard_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
        raise NetworkAccessError(f"test tried to connect to {address!r}; nailkit must work offline")
    return _real_connect_ex(self, address)


def _guard_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost") and not _is_loopback((host,)):
        raise NetworkAccessError(f"test tried to resolve {host!r}; nailkit must work offline")
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def socket_guard(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _guard_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guard_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", _guard_getaddrinfo)
    yield


@pytest.fixture(scope="session")
def outputs_dir() -> Path:
    """The shared outputs/ dir: notebooks and tests reuse each other's artifacts (demo checkpoint, ONNX, TFLite)."""
    d = REPO / "outputs"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="session")
def demo_ckpt(outputs_dir) -> Path:
    from nailkit.model import demo_checkpoint_path

    return demo_checkpoint_path(outputs_dir)


@pytest.fixture(scope="session")
def demo_model(demo_ckpt):
    from nailkit.model import load_model

    return load_model(demo_ckpt)
