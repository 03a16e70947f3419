"""The GPU delegate's own verdict on a ``.tflite``, in a child process (no phone needed).

``delegate_verdict(path, enforce_f32=False)`` compiles the file with LiteRT's **own** GPU accelerator (the WebGPU
accelerator shipped in ai-edge-litert 2.3, ``libLiteRtWebGpuAccelerator.so``) — GPU alone, no CPU fallback — under
SwiftShader's Vulkan driver (a CPU implementation of Vulkan, from Debian's ``chromium`` package), and runs it.
It reports what the delegate itself logs: the adapter, ops on the GPU / total, each refused op with the delegate's
reason, ``is_fully_accelerated()``, and the GPU run's outputs. It runs in a child process
(``python -m nailkit.gpu.delegate _verdict ...`` through ``nailkit.core.subproc.run_python``: killed with its process
group at the timeout) whose environment holds ``VK_ICD_FILENAMES`` and a private ``XDG_RUNTIME_DIR``
(``nailkit.gpu.swiftshader.gpu_env``), so the driver settings never leak into the caller.

``python -m nailkit.gpu.delegate verdict|check FILE.tflite ...`` prints the op check (``nailkit.gpu.op_check``) and,
for ``verdict``, the delegate's verdict in both precisions.

Nothing here imports tensorflow. The child process imports ai_edge_litert and numpy only.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from nailkit.core import subproc
from nailkit.gpu.op_check import op_check
from nailkit.gpu.swiftshader import gpu_env, gpu_unavailable_reason

_RE_ADAPTER = re.compile(r"Selected adapter:\s*(.+)")
_RE_SPLIT = re.compile(r"(\d+) operations? will run on the GPU, "
                       r"and the remaining (\d+) operations? will run on the CPU")
_RE_REFUSED_HDR = "Following operations are not supported by GPU delegate:"
_RE_REFUSAL = re.compile(r"^([A-Z][A-Z0-9_]+):\s*(.*)$")


@dataclass
class DelegateVerdict:
    """What LiteRT's GPU accelerator said about one file (see ``delegate_verdict``)."""

    path: str
    accelerators: str  # "gpu" (GPU alone) or "gpu+cpu"
    enforce_f32: bool
    available: bool  # False: the driver is missing here (``reason`` says why); nothing else is meaningful
    reason: str = ""
    adapter: str = ""
    compiled: bool = False
    fully_accelerated: Optional[bool] = None
    ops_total: int = 0
    ops_on_gpu: Optional[int] = None
    ops_on_cpu: Optional[int] = None
    refusals: list[dict[str, str]] = field(default_factory=list)  # [{"op", "reason", "where"}] as logged
    error: str = ""
    run_ms: Optional[float] = None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # signature output name → array (GPU run)
    output_order: list[str] = field(default_factory=list)
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        """Compiled with the GPU alone, fully accelerated, every op on the GPU, and ran."""
        return bool(self.available and self.compiled and self.fully_accelerated and not self.refusals
                    and self.ops_on_gpu == self.ops_total and self.outputs)

    def refusal_summary(self) -> dict[str, dict[str, int]]:
        """{op: {reason: count}} with locations dropped."""
        out: dict[str, dict[str, int]] = {}
        for r in self.refusals:
            d = out.setdefault(r["op"], {})
            d[r["reason"]] = d.get(r["reason"], 0) + 1
        return out

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("outputs")
        d.pop("log_tail")
        d["refusals"] = self.refusal_summary()
        d["ok"] = self.ok
        d["output_shapes"] = {k: list(v.shape) for k, v in self.outputs.items()}
        return d

    def line(self) -> str:
        if not self.available:
            return f"GPU check skipped: {self.reason}"
        mode = "GPU alone" if self.accelerators == "gpu" else "GPU+CPU"
        prec = "enforce_f32" if self.enforce_f32 else "default precision"
        gpu = "?" if self.ops_on_gpu is None else self.ops_on_gpu
        s = (f"{Path(self.path).name}: {gpu}/{self.ops_total} ops on GPU ({mode}, {prec}); "
             f"compiled={self.compiled} fully_accelerated={self.fully_accelerated}")
        if self.refusals:
            s += "; refused: " + ", ".join(f"{op}×{sum(r.values())}" for op, r in self.refusal_summary().items())
        if self.error:
            s += f"; error: {self.error.splitlines()[-1][:160]}"
        return s


def _split_where(text: str) -> tuple[str, str]:
    """'Tensor dimensions must be less than 5. __main__.M;16' → (reason, location)."""
    text = text.strip()
    m = re.match(r"^(.*\.)\s+(\S+)$", text)
    if m and not m.group(2).endswith("."):
        return m.group(1), m.group(2)
    return text, ""


def parse_delegate_log(log: str) -> dict[str, Any]:
    """The GPU delegate's statements in a LiteRT log: adapter, GPU/CPU op split, refused ops with reasons."""
    out: dict[str, Any] = {"adapter": "", "ops_on_gpu": None, "ops_on_cpu": None, "refusals": []}
    lines = log.splitlines()
    in_block = False
    for ln in lines:
        m = _RE_ADAPTER.search(ln)
        if m:
            out["adapter"] = m.group(1).strip()
        m = _RE_SPLIT.search(ln)
        if m:
            out["ops_on_gpu"], out["ops_on_cpu"] = int(m.group(1)), int(m.group(2))
            in_block = False
            continue
        if _RE_REFUSED_HDR in ln:
            in_block = True
            continue
        if in_block:
            m = _RE_REFUSAL.match(ln.strip())
            if m:
                reason, where = _split_where(m.group(2))
                out["refusals"].append({"op": m.group(1), "reason": reason, "where": where})
            elif ln.strip():
                in_block = False
    return out


def _child_verdict(model: str, accel: str, enforce_f32: str, in_npz: str, out_npz: str, runs: str) -> None:
    """Runs in the child process (``python -m nailkit.gpu.delegate _verdict ...``): compile, run, and report the
    result line (``subproc.emit``); the delegate's own log goes to stdout/stderr, where the parent reads it."""
    import time

    res: dict[str, Any] = {"compiled": False, "fully_accelerated": None, "error": "", "run_ms": None,
                           "inputs": {}, "outputs": []}
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator as HA
        from ai_edge_litert.options import GpuOptions, Options

        hw = HA.GPU if accel == "gpu" else (HA.GPU | HA.CPU)
        opts = Options(hardware_accelerators=hw, gpu_options=GpuOptions(enforce_f32=enforce_f32 == "1"))
        cm = CompiledModel.from_file(model, options=opts)
        res["compiled"] = True
        res["fully_accelerated"] = bool(cm.is_fully_accelerated())
        sigs = cm.get_signature_list()
        sig = list(sigs)[0]
        in_det = cm.get_input_tensor_details(sig)
        out_det = cm.get_output_tensor_details(sig)
        feeds = dict(np.load(in_npz)) if in_npz else {}
        ins = cm.create_input_buffers(0)
        outs = cm.create_output_buffers(0)
        rng = np.random.default_rng(0)
        for i, name in enumerate(sigs[sig]["inputs"]):
            d = in_det[name]
            arr = feeds.get(name, feeds.get(f"arg{i}"))
            if arr is None:
                arr = (rng.standard_normal(d["shape"]) * 0.5)
            arr = np.ascontiguousarray(np.asarray(arr, dtype=d["dtype"]).reshape(d["shape"]))
            res["inputs"][name] = list(d["shape"])
            ins[i].write(arr)
        times = []
        for _ in range(max(1, int(runs))):
            t0 = time.perf_counter()
            cm.run_by_index(0, ins, outs)
            times.append((time.perf_counter() - t0) * 1e3)
        res["run_ms"] = float(np.median(times))
        arrays = {}
        for i, name in enumerate(sigs[sig]["outputs"]):
            d = out_det[name]
            n = int(np.prod(d["shape"]))
            arrays[name] = np.asarray(outs[i].read(n, np.dtype(d["dtype"]))).reshape(d["shape"])
            res["outputs"].append(name)
        np.savez(out_npz, **arrays)
    except Exception as exc:  # noqa: BLE001 - the verdict reports it
        res["error"] = f"{type(exc).__name__}: {exc}"
    subproc.emit(res)


def _child_log(log_path: Path) -> str:
    """The child's merged stdout/stderr as ``run_python`` logged it, without its command line and result line."""
    if not log_path.exists():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()
    return "\n".join(ln for i, ln in enumerate(lines)
                     if not (i == 0 and ln.startswith("$ ")) and not ln.startswith(subproc.RESULT_PREFIX))


def delegate_verdict(path: str | os.PathLike[str], enforce_f32: bool = False, *,
                     inputs: Optional[dict[str, np.ndarray] | Sequence[np.ndarray]] = None,
                     allow_cpu: bool = False, runs: int = 1, timeout: float = 900) -> DelegateVerdict:
    """Compile ``path`` with LiteRT's GPU accelerator (alone unless ``allow_cpu``) under SwiftShader, and run it.

    ``inputs``: by signature input name, or a sequence in signature order; missing inputs get N(0, 0.5²) noise
    (seed 0). Returns the delegate's verdict with the GPU run's outputs (by signature output name).
    """
    path = str(Path(path).resolve())
    v = DelegateVerdict(path=path, accelerators="gpu+cpu" if allow_cpu else "gpu", enforce_f32=bool(enforce_f32),
                        available=False)
    v.ops_total = op_check(path).n_ops
    why = gpu_unavailable_reason()
    if why:
        v.reason = why
        return v
    v.available = True
    with tempfile.TemporaryDirectory(prefix="nailkit-gpu-") as tmp:
        in_npz = ""
        if inputs is not None:
            if not isinstance(inputs, dict):
                inputs = {f"arg{i}": a for i, a in enumerate(inputs)}
            in_npz = os.path.join(tmp, "in.npz")
            np.savez(in_npz, **{k: np.asarray(a) for k, a in inputs.items()})
        out_npz = os.path.join(tmp, "out.npz")
        xdg = os.path.join(tmp, "xdg")
        os.mkdir(xdg, 0o700)
        args = ["-m", "nailkit.gpu.delegate", "_verdict", path, v.accelerators, "1" if enforce_f32 else "0",
                in_npz, out_npz, str(int(runs))]
        # the verdict is read from the delegate's log: keep LiteRT's INFO lines (child_env would quiet them)
        env = gpu_env(subproc.child_env({"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0")}),
                      runtime_dir=xdg)
        log_path = Path(tmp) / "child.log"
        res: Optional[dict[str, Any]] = None
        failure = None
        try:
            res = subproc.run_python(args, desc=f"GPU delegate verdict {Path(path).name}", timeout=timeout,
                                     log_path=log_path, progress=False, env=env)
        except subproc.WorkerError as exc:
            failure, res = exc, exc.result  # a child that reported and then crashed on exit still has a verdict
        log = _child_log(log_path)
        parsed = parse_delegate_log(log)
        v.adapter = parsed["adapter"]
        v.refusals = parsed["refusals"]
        v.ops_on_gpu, v.ops_on_cpu = parsed["ops_on_gpu"], parsed["ops_on_cpu"]
        v.log_tail = "\n".join(ln for ln in log.splitlines() if ln.strip())[-6000:]
        if failure is not None and failure.timed_out:
            v.error = f"GPU run timed out after {timeout:.0f} s"
            return v
        if res is None:
            rc = failure.returncode if failure is not None else "?"
            v.error = f"GPU child process died (rc {rc}): " + (log.strip().splitlines() or ["?"])[-1]
            return v
        v.compiled, v.fully_accelerated, v.error, v.run_ms = (res["compiled"], res["fully_accelerated"],
                                                              res["error"], res["run_ms"])
        if v.compiled and v.ops_on_gpu is None and v.fully_accelerated and not v.refusals:
            # the delegate prints the split only when it leaves ops behind; fully accelerated = every op
            v.ops_on_gpu, v.ops_on_cpu = v.ops_total, 0
        if res["outputs"] and os.path.exists(out_npz):
            with np.load(out_npz) as z:
                v.outputs = {k: z[k] for k in res["outputs"]}
            v.output_order = list(res["outputs"])
    return v


def _main(argv: list[str]) -> None:
    if argv and argv[0] == "_verdict":
        _child_verdict(*argv[1:])
        return
    if argv and argv[0] in ("verdict", "check"):
        for p in argv[1:]:
            print(op_check(p).line())
            if argv[0] == "verdict":
                for f32 in (False, True):
                    print("  " + delegate_verdict(p, enforce_f32=f32).line())
        return
    raise SystemExit("usage: python -m nailkit.gpu.delegate verdict|check FILE.tflite ...")


if __name__ == "__main__":
    _main(sys.argv[1:])
