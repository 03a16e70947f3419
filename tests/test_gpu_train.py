"""The CPU-side parts of the GPU training path (nailkit/train/gpu/, tools/gpu_train.sh): chunking within the return
limits, reassembly with sha256 checks (a corrupt or missing chunk refused), the wheel list and its Requires-Dist
check, the working tree's transfer size, and taking the tracked model out of the transfer and back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nailkit.core.artifacts import file_sha256
from nailkit.train.gpu.chunks import (CHUNK_SIZE, CHUNKS_PER_CALL, MANIFEST, calls_needed, reassemble, split_file,
                                      stage_call)
from nailkit.train.gpu.limits import RETURN_MAX_CALL, RETURN_MAX_FILE, RETURN_MAX_FILES, GpuTransferError
from nailkit.train.gpu.transfer import (TRACKED_MODEL, check_transfer, restore, transfer_files, untrack,
                                        untracked_for_call)
from nailkit.train.gpu.wheels import ROOTS, check_wheels, requirement_closure, wheel_metadata, wheels_to_install


def _blob(path, n, seed=0):
    import random

    path.write_bytes(random.Random(seed).randbytes(n))
    return path


def test_chunks_round_trip_over_several_calls(tmp_path):
    src = _blob(tmp_path / "model.pth", 10_000 + 7)
    state = tmp_path / "state"
    m = split_file(src, state, chunk_size=1000, extra={"training": {"steps": 5}})
    assert len(m["chunks"]) == 11 and m["chunks"][-1]["size"] == 7 and m["sha256"] == file_sha256(src, 64)
    assert m["calls"] == calls_needed(11) == 3 and m["training"] == {"steps": 5}
    calls = []
    for k in range(3):  # one $OUT per device call, as the tool returns them
        out = tmp_path / f"call{k}"
        files = stage_call(state, out, k, extra_files=[src.parent / "absent.log"])
        assert len(files) <= RETURN_MAX_FILES and (out / MANIFEST).exists()
        calls.append(out)
    with pytest.raises(GpuTransferError, match="no chunks left"):
        stage_call(state, tmp_path / "call3", 3)
    back = tmp_path / "back.pth"
    reassemble(list(reversed(calls)), back)  # any order of folders
    assert back.read_bytes() == src.read_bytes()


def test_a_real_size_pth_fits_the_return_limits(tmp_path):
    n = 135_701_231  # the packaged demo model
    chunks = -(-n // CHUNK_SIZE)
    assert CHUNK_SIZE <= RETURN_MAX_FILE and chunks == 9 and calls_needed(chunks) == 3
    per_call = CHUNKS_PER_CALL * CHUNK_SIZE + 3 * (1 << 20)  # + manifest, eval.json, log tail (< 1 MiB each)
    assert per_call <= RETURN_MAX_CALL and CHUNKS_PER_CALL + 3 <= RETURN_MAX_FILES
    with pytest.raises(GpuTransferError, match="per-file return limit"):
        split_file(_blob(tmp_path / "x", 10), tmp_path / "s", chunk_size=RETURN_MAX_FILE + 1)


def test_corrupt_or_missing_chunk_is_refused(tmp_path):
    src = _blob(tmp_path / "model.pth", 5000, seed=1)
    state = tmp_path / "state"
    split_file(src, state, chunk_size=1000)
    bad = state / "model.pth.part002"
    data = bytearray(bad.read_bytes())
    data[10] ^= 0xFF  # same size, one bit pattern changed
    bad.write_bytes(bytes(data))
    out = tmp_path / "back.pth"
    with pytest.raises(GpuTransferError, match=r"part002: corrupt chunk"):
        reassemble([state], out)
    assert not out.exists() and not (tmp_path / "back.pth.partial").exists()
    bad.unlink()
    with pytest.raises(GpuTransferError, match="chunk model.pth.part002 missing"):
        reassemble([state], out)
    assert not out.exists()
    other = tmp_path / "other"
    split_file(_blob(tmp_path / "model.pth", 5000, seed=2), other, chunk_size=1000)
    with pytest.raises(GpuTransferError, match="manifest of another file"):
        reassemble([state, other], out)


def _wheel(folder, name, version, requires=()):
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_requirements_are_checked(tmp_path):
    w = tmp_path / "wheels"
    w.mkdir()
    _wheel(w, "rfdetr", "1.11.2", ["numpy", "transformers<6.0.0,>=5.1.0", "supervision>=0.29.0",
                                   "peft; extra == \"train\"", "pywin32; sys_platform == \"win32\""])
    _wheel(w, "supervision", "0.31.2", ["av>=14.2", "matplotlib>=3.6"])
    assert wheel_metadata(w / "rfdetr-1.11.2-py3-none-any.whl")[:2] == ("rfdetr", "1.11.2")
    # here: preinstalled names count, versions unknown; extras and other platforms do not apply; av is never carried
    assert check_wheels(w) == ["supervision-0.31.2-py3-none-any.whl needs matplotlib>=3.6: neither carried nor "
                                 "installed"]
    _wheel(w, "matplotlib", "3.11.2")
    assert check_wheels(w) == []
    # there: the installed versions are checked against each wheel's Requires-Dist
    problems = check_wheels(w, installed={"numpy": "2.1.0", "transformers": "4.57.0"})
    assert problems == ["rfdetr-1.11.2-py3-none-any.whl needs transformers<6.0.0,>=5.1.0: installed transformers "
                        "4.57.0 does not satisfy it (carry a wheel)"]
    _wheel(w, "supervision", "0.28.0")
    (w / "supervision-0.31.2-py3-none-any.whl").unlink()
    assert any("carried supervision 0.28.0 does not satisfy" in p for p in check_wheels(w))


def test_wheels_to_install_skips_what_fits(tmp_path):
    w = tmp_path / "wheels"
    w.mkdir()
    _wheel(w, "rfdetr", "1.11.2", ["pydantic<3,>=2.0"])
    _wheel(w, "pydantic", "2.11.10")
    _wheel(w, "matplotlib", "3.11.2")
    picked = {p.name.split("-")[0] for p in wheels_to_install(w, {"pydantic": "1.10.0", "matplotlib": "3.9.0"})}
    assert picked == {"rfdetr", "pydantic"}  # pydantic 1 does not fit rfdetr's <3,>=2; matplotlib 3.9 is kept


def test_requirement_closure_walks_requires_dist():
    reqs = {"rfdetr": ["numpy", "supervision>=0.29", "peft; extra == 'train'"], "supervision": ["av>=14", "matplotlib"],
            "matplotlib": ["pyparsing>=3", "numpy"], "pyparsing": [], "numpy": []}
    versions = {"rfdetr": "1.11.2", "supervision": "0.31.2", "matplotlib": "3.11.2", "pyparsing": "3.3.3",
                "numpy": "2.2.6"}
    plan = requirement_closure(["rfdetr"], requires=reqs.get, version=versions.get)
    assert plan == [("matplotlib", "3.11.2"), ("pyparsing", "3.3.3"), ("rfdetr", "1.11.2"), ("supervision", "0.31.2")]
    # the real environment: rfdetr's training set without the machine's preinstalled packages or torch's own build
    real = dict(requirement_closure(ROOTS))
    assert {"rfdetr", "pycocotools", "faster-coco-eval", "supervision", "pydantic"} <= set(real)
    assert not {"torch", "torchvision", "numpy", "transformers", "av", "opencv-python", "roboflow"} & set(real)


def _git_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "data" / "models").mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, env=env)  # noqa
    run("init", "-q")
    (repo / ".gitignore").write_text("*.pth\n!data/models/*.pth\nbuild/\n")
    _blob(repo / TRACKED_MODEL, 3 << 20)
    (repo / "code.py").write_text("x = 1\n")
    run("add", ".")
    run("commit", "-q", "-m", "init")
    return repo, run


def test_transfer_size_and_untrack_restore(tmp_path):
    repo, run = _git_repo(tmp_path)
    (repo / "notes.txt").write_text("untracked, not ignored: travels\n")
    (repo / "build").mkdir()
    _blob(repo / "build" / "big.bin", 2 << 20)  # ignored: stays unless carried
    _blob(repo / "wheels.whl", 1 << 20)
    total = check_transfer(repo)
    assert total == sum(s for _, s in transfer_files(repo)) and total > 4 << 20  # model + wheels.whl + text
    assert check_transfer(repo, carry=["build"]) == total + (2 << 20)
    with pytest.raises(GpuTransferError, match=r"over the 4 MiB limit; largest: " + re.escape(TRACKED_MODEL)):
        check_transfer(repo, limit=4 << 20)
    older = "data/models/superseded_model.pth"  # a superseded model waiting for its deletion travels no more
    _blob(repo / older, 1 << 10)
    run("add", older)
    run("commit", "-q", "-m", "older")
    (repo / TRACKED_MODEL).write_bytes(b"changed, not staged")  # someone's edit
    before = subprocess.run(["git", "-C", str(repo), "ls-files", "-s"], capture_output=True, text=True).stdout
    with untracked_for_call(repo) as entries:
        assert sorted(e["path"] for e in entries) == sorted([TRACKED_MODEL, older])
        assert older not in [p for p, _ in transfer_files(repo)]
        # neither tracked nor un-ignored, despite .gitignore's !data/models/*.pth (info/exclude would lose to it)
        assert TRACKED_MODEL not in [p for p, _ in transfer_files(repo)]
        run("check-ignore", "-q", TRACKED_MODEL)
        assert "data/models/.gitignore" not in [p for p, _ in transfer_files(repo)]  # ignores itself
        assert check_transfer(repo, limit=2 << 20) < 2 << 20
        with pytest.raises(GpuTransferError, match="not restored"):
            untrack(repo)
    after = subprocess.run(["git", "-C", str(repo), "ls-files", "-s"], capture_output=True, text=True).stdout
    assert after == before  # the exact index entry, not the changed file
    assert not (repo / "data" / "models" / ".gitignore").exists()  # the call's own .gitignore is gone again
    assert (repo / TRACKED_MODEL).read_bytes() == b"changed, not staged"
    assert restore(repo) == []  # nothing pending


def test_gpu_train_script_is_wired():
    script = (Path(__file__).resolve().parents[1] / "tools" / "gpu_train.sh")
    text = script.read_text()
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for needed in ("install-wheels", "machine-train", "stage", "--call 0", "send"):
        assert needed in text
    help_text = subprocess.run([sys.executable, "-m", "nailkit.train.gpu", "--help"], capture_output=True,
                               text=True).stdout
    assert all(c in help_text for c in ("wheels", "check-transfer", "untrack", "restore", "assemble", "stage"))
    assert json.loads(json.dumps(list(ROOTS)))  # plain data
