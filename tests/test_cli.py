"""python -m nailkit: every user error is one line (no traceback); workbook hands notebooks absolute paths."""

from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from nailkit import cli
from nailkit.core import notebooks


@pytest.mark.parametrize("exc", [KeyError("class_names"), TypeError("'NoneType' object is not subscriptable"),
                                 ValueError("bad.pth: not a checkpoint")])
def test_user_errors_are_one_line(monkeypatch, capsys, exc):
    def handler(args):
        raise exc

    monkeypatch.setattr(cli, "cli_inspect", handler)
    assert cli.main(["inspect", "whatever.pth"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("nailkit inspect: error: ")
    if not isinstance(exc, ValueError):
        assert type(exc).__name__ in err


def test_protobuf_decode_error_is_one_line(tmp_path, capsys):
    """A corrupt .onnx reaches onnx's protobuf parser: DecodeError, not a traceback."""
    from google.protobuf.message import DecodeError

    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
    import onnx

    with pytest.raises(DecodeError):
        onnx.load(str(bad))

    def handler(args):
        onnx.load(str(bad))

    import nailkit.cli as c

    orig = c.cli_inspect
    c.cli_inspect = handler
    try:
        assert cli.main(["inspect", str(bad)]) == 2
    finally:
        c.cli_inspect = orig
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "DecodeError" in err


def test_workbook_passes_an_absolute_checkpoint(tmp_path, monkeypatch, capsys):
    """Notebooks run with cwd=notebooks/: a relative --checkpoint must reach them resolved from the caller's cwd."""
    ckpt = tmp_path / "runs" / "checkpoint_best_total.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    seen = []
    monkeypatch.setattr(notebooks, "run_notebook", lambda nb, params: seen.append((nb.stem, params)) or nb)
    monkeypatch.chdir(tmp_path)
    args = types.SimpleNamespace(only=["01"], checkpoint=os.path.join("runs", "checkpoint_best_total.pth"),
                                 quick=False)
    assert notebooks.cli_workbook(args) == 0
    assert seen == [("01_inspect_checkpoint", {"checkpoint": str(ckpt)})]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        notebooks.cli_workbook(types.SimpleNamespace(only=["01"], checkpoint="missing.pth", quick=False))


def test_main_turns_the_offline_guard_on(monkeypatch):
    import socket

    from nailkit.core import offline

    monkeypatch.setattr(socket, "getaddrinfo", offline._real_getaddrinfo)  # no guard before main() runs
    cli.main(["strip-notebooks", str(Path(__file__).parent / "no-such-dir")])
    assert os.environ.get("NAILKIT_OFFLINE") == "1" and socket.getaddrinfo is offline._guard_getaddrinfo
    with pytest.raises(offline.NetworkAccessError, match="offline"):
        socket.getaddrinfo("example.com", 80)
