"""The GPU target: checks that need no phone, and the two-graph split for LiteRT's GPU delegate.

Checks usable on any ``.tflite``:

* ``delegate_verdict(path, enforce_f32=False)`` compiles the file with LiteRT's **own** GPU accelerator (the WebGPU
  accelerator shipped in ai-edge-litert 2.3, ``libLiteRtWebGpuAccelerator.so``) — GPU alone, no CPU fallback — under
  SwiftShader's Vulkan driver (a CPU implementation of Vulkan, from Debian's ``chromium`` package), and runs it.
  It reports what the delegate itself logs: the adapter, ops on the GPU / total, each refused op with the delegate's
  reason, ``is_fully_accelerated()``, and the GPU run's outputs. It runs in a child process whose environment holds
  ``VK_ICD_FILENAMES`` and a private ``XDG_RUNTIME_DIR``, so the driver settings never leak into the caller.
* ``op_check(path)`` reads the flatbuffer: no TOPK/GATHER/GATHER_ND/CAST-to-int (and no sort), no tensor above 4-D;
  it lists every op type that remains.
* ``activation_maxima(module, inputs)`` records, in PyTorch, the largest |activation| that feeds each LayerNorm and
  softmax, and for LayerNorm the largest per-row sum of squared deviations in the domain where the reduction happens
  (fp16's largest finite value is 65504; a Mali/Adreno delegate reduces in fp16 whatever the file's dtype).

The split itself (``build_gpu_graphs``) follows google-ai-edge/litert-samples' RF-DETR GPU recipe, extended with the
segmentation head; see that function.

Nothing here imports tensorflow. The child process imports ai_edge_litert and numpy only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# SwiftShader (Vulkan on the CPU) for the WebGPU accelerator
# ----------------------------------------------------------------------------------------------------------------

SWIFTSHADER_ICDS = (
    "/usr/lib/chromium/vk_swiftshader_icd.json",  # Debian/Ubuntu `chromium`
    "/usr/lib/chromium-browser/vk_swiftshader_icd.json",
    "/usr/share/vulkan/icd.d/vk_swiftshader_icd.json",
)
VULKAN_LOADER = "libvulkan.so.1"
FP16_MAX = 65504.0


def swiftshader_icd() -> Optional[Path]:
    """The SwiftShader ICD file (``$NAILKIT_VK_ICD`` first), or None."""
    cands = [os.environ.get("NAILKIT_VK_ICD", "")] + list(SWIFTSHADER_ICDS)
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    return None


def _has_vulkan_loader() -> bool:
    import ctypes

    try:
        ctypes.CDLL(VULKAN_LOADER)
        return True
    except OSError:
        return False


def gpu_unavailable_reason() -> Optional[str]:
    """One line saying why the GPU check cannot run here, or None when it can."""
    try:
        import ai_edge_litert  # noqa: F401
    except ImportError:
        return "ai-edge-litert is not installed"
    lib = Path(__import__("ai_edge_litert").__file__).parent / "libLiteRtWebGpuAccelerator.so"
    if not lib.exists():
        return f"ai-edge-litert has no WebGPU accelerator ({lib.name} missing)"
    icd = swiftshader_icd()
    if icd is None:
        return ("SwiftShader Vulkan driver not found (no vk_swiftshader_icd.json; `apt-get install -y chromium "
                "libvulkan1` installs it)")
    try:
        spec = json.loads(icd.read_text())
        lib_path = Path(spec["ICD"]["library_path"])
        if not lib_path.is_absolute():
            lib_path = icd.parent / lib_path
        if not lib_path.exists():
            return f"{icd} points at {lib_path}, which does not exist"
    except Exception as exc:  # noqa: BLE001
        return f"{icd}: unreadable ICD file ({exc})"
    if not _has_vulkan_loader():
        return f"Vulkan loader {VULKAN_LOADER} not found (`apt-get install -y libvulkan1`)"
    return None


def gpu_env(base: Optional[dict] = None, runtime_dir: Optional[str] = None) -> dict[str, str]:
    """An environment for a child process: SwiftShader as the only Vulkan ICD and a private XDG_RUNTIME_DIR."""
    env = dict(os.environ if base is None else base)
    icd = swiftshader_icd()
    if icd is not None:
        env["VK_ICD_FILENAMES"] = str(icd)
        env["VK_DRIVER_FILES"] = str(icd)
    if runtime_dir is None:
        runtime_dir = tempfile.mkdtemp(prefix="nailkit-xdg-")
    os.chmod(runtime_dir, 0o700)
    env["XDG_RUNTIME_DIR"] = runtime_dir
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    return env


# ----------------------------------------------------------------------------------------------------------------
# the delegate's own verdict
# ----------------------------------------------------------------------------------------------------------------

_MARK = "@@NAILKIT_GPU_VERDICT@@"
_RE_ADAPTER = re.compile(r"Selected adapter:\s*(.+)")
_RE_SPLIT = re.compile(r"(\d+) operations? will run on the GPU, and the remaining (\d+) operations? will run on the CPU")
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
    """Runs in the child process (``python -m nailkit.gpu _verdict ...``): compile, run, print one JSON line."""
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
    sys.stdout.flush()
    print(_MARK + json.dumps(res), flush=True)


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
        cmd = [sys.executable, "-m", "nailkit.gpu", "_verdict", path, "gpu+cpu" if allow_cpu else "gpu",
               "1" if enforce_f32 else "0", in_npz, out_npz, str(int(runs))]
        try:
            proc = subprocess.run(cmd, env=gpu_env(runtime_dir=xdg), capture_output=True, text=True,
                                  timeout=timeout, cwd=str(Path(__file__).resolve().parent.parent))
        except subprocess.TimeoutExpired:
            v.error = f"GPU run timed out after {timeout:.0f} s"
            return v
        log = proc.stderr + "\n" + proc.stdout
        parsed = parse_delegate_log(log)
        v.adapter = parsed["adapter"]
        v.refusals = parsed["refusals"]
        v.ops_on_gpu, v.ops_on_cpu = parsed["ops_on_gpu"], parsed["ops_on_cpu"]
        v.log_tail = "\n".join(ln for ln in log.splitlines() if ln.strip())[-6000:]
        res = None
        for ln in proc.stdout.splitlines():
            if ln.startswith(_MARK):
                res = json.loads(ln[len(_MARK):])
        if res is None:
            v.error = f"GPU child process died (rc {proc.returncode}): " + (log.strip().splitlines() or ["?"])[-1]
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


# ----------------------------------------------------------------------------------------------------------------
# op check over the flatbuffer
# ----------------------------------------------------------------------------------------------------------------

# Never on a mobile GPU delegate: the selection ops, and index math.
BANNED_OPS = frozenset({"TOPK_V2", "GATHER", "GATHER_ND", "STABLEHLO_SORT", "STABLEHLO_GATHER", "SCATTER_ND",
                        "STABLEHLO_SCATTER"})
INT_TYPES = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"})
# Not banned, but listed: ops the litert-samples recipe avoids for the Mali/Adreno delegates.
ADVISORY_OPS = frozenset({"SELECT", "SELECT_V2", "WHERE", "BROADCAST_TO", "POW", "GELU", "ERF", "CUMSUM",
                          "EMBEDDING_LOOKUP", "FLOOR_DIV", "FLOOR_MOD", "CUSTOM", "ARG_MAX", "ARG_MIN"})


@dataclass
class OpCheck:
    path: str
    n_ops: int  # operators of the main subgraph (what the delegate counts)
    histogram: dict[str, int]  # op type → count (all subgraphs)
    banned: dict[str, int]  # TOPK/GATHER/... and "CAST→INT32" style entries
    over_4d: list[tuple[str, list[int]]]  # tensors above 4-D (name, shape)
    advisory: dict[str, int]
    int_tensors: int  # non-constant integer/bool activation tensors
    n_subgraphs: int = 1

    @property
    def ok(self) -> bool:
        return not self.banned and not self.over_4d

    def line(self) -> str:
        s = f"{Path(self.path).name}: {self.n_ops} ops, {'GPU-clean' if self.ok else 'BLOCKERS'}"
        if self.banned:
            s += "; banned " + ", ".join(f"{k}×{v}" for k, v in self.banned.items())
        if self.over_4d:
            s += f"; {len(self.over_4d)} tensors above 4-D (max rank {max(len(t[1]) for t in self.over_4d)})"
        return s

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d["over_4d_count"] = len(self.over_4d)
        d["over_4d"] = [list(t) for t in self.over_4d[:20]]
        d["ok"] = self.ok
        return d


def _schema():
    from ai_edge_litert import schema_py_generated as s

    return s


def _enum_names(cls) -> dict[int, str]:
    return {v: k for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def _read_model(path: str | os.PathLike[str]):
    s = _schema()
    buf = Path(path).read_bytes()
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ValueError(f"{path}: not a TFLite flatbuffer (no TFL3 identifier)")
    return s.Model.GetRootAs(buf, 0), buf


def op_check(path: str | os.PathLike[str]) -> OpCheck:
    """Op histogram, banned ops (incl. CAST to an integer type) and tensors above 4-D, from the flatbuffer alone."""
    s = _schema()
    model, _ = _read_model(path)
    op_names = _enum_names(s.BuiltinOperator)
    type_names = _enum_names(s.TensorType)
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        name = op_names.get(code, f"OP_{code}")
        if name == "CUSTOM" and oc.CustomCode():
            name = "CUSTOM:" + oc.CustomCode().decode()
        codes.append(name)
    hist: dict[str, int] = {}
    banned: dict[str, int] = {}
    over: list[tuple[str, list[int]]] = []
    n_main = 0
    int_tensors = 0
    for g in range(model.SubgraphsLength()):
        sg = model.Subgraphs(g)
        const = set()
        for t in range(sg.TensorsLength()):
            ten = sg.Tensors(t)
            if ten.Buffer() > 0 and model.Buffers(ten.Buffer()) is not None and \
                    (model.Buffers(ten.Buffer()).DataLength() > 0 or model.Buffers(ten.Buffer()).Size() > 0):
                const.add(t)
            shape = [int(x) for x in ten.ShapeAsNumpy()] if ten.ShapeLength() else []
            if len(shape) > 4:
                over.append(((ten.Name() or b"").decode(errors="replace"), shape))
            if t not in const and type_names.get(ten.Type(), "") in INT_TYPES:
                int_tensors += 1
        if g == 0:
            n_main = sg.OperatorsLength()
        for o in range(sg.OperatorsLength()):
            op = sg.Operators(o)
            name = codes[op.OpcodeIndex()]
            hist[name] = hist.get(name, 0) + 1
            if name in BANNED_OPS:
                banned[name] = banned.get(name, 0) + 1
            if name == "CAST" and op.OutputsLength():
                out_t = type_names.get(sg.Tensors(op.Outputs(0)).Type(), "?")
                if out_t in INT_TYPES:
                    key = f"CAST→{out_t}"
                    banned[key] = banned.get(key, 0) + 1
    advisory = {k: v for k, v in hist.items() if k in ADVISORY_OPS or k.startswith(("CUSTOM", "STABLEHLO_"))}
    return OpCheck(path=str(path), n_ops=n_main, histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
                   banned=banned, over_4d=over, advisory=advisory, int_tensors=int_tensors,
                   n_subgraphs=model.SubgraphsLength())


# ----------------------------------------------------------------------------------------------------------------
# fp16 safety: activations feeding LayerNorm / softmax, and a scale-invariant LayerNorm
# ----------------------------------------------------------------------------------------------------------------

def _ln_stats(x, dim: int, domain_scale=None) -> dict[str, float]:
    """max|x| and the largest per-row Σ(x−μ)² in the reduction domain (x/S when ``domain_scale`` is given)."""
    import torch

    x = x.detach().float()
    xr = x / domain_scale if domain_scale is not None else x
    d = xr - xr.mean(dim, keepdim=True)
    return {"max_abs_in": float(x.abs().max()), "max_abs_reduced": float(xr.abs().max()),
            "max_sumsq": float((d * d).sum(dim).max()), "max_sum_sq_raw": float((xr * xr).sum(dim).max()),
            "channels": int(x.shape[dim])}


class _Recorder:
    active: Optional["_Recorder"] = None

    def __init__(self) -> None:
        self.sites: dict[str, dict[str, Any]] = {}
        self.stack: list[str] = []

    def add(self, kind: str, stats: dict[str, float]) -> None:
        where = self.stack[-1] if self.stack else "<top>"
        key = f"{kind}@{where}"
        cur = self.sites.get(key)
        if cur is None:
            self.sites[key] = dict(stats, kind=kind, module=where, calls=1)
        else:
            cur["calls"] += 1
            for k, v in stats.items():
                if isinstance(v, float):
                    cur[k] = max(cur[k], v)


_SAFE_LN_CLASS = None


def _make_safe_ln_class():
    import torch
    from torch import nn

    class SafeLayerNorm(nn.Module):
        """LayerNorm over the last dim that reduces in a down-scaled domain: exact (LayerNorm is scale invariant).

        S = max(1, max|x| / 8) per row (the litert-samples' adaptive scale): a row of C values then has
        Σ(x/S)² ≤ 64·C (16384 for C=256), below fp16's 65504, and rows with small values are untouched (S = 1).
        """

        def __init__(self, ln: nn.Module, channels_first: bool = False) -> None:
            super().__init__()
            self.weight = ln.weight
            self.bias = ln.bias
            self.eps = float(ln.eps)
            self.channels_first = channels_first
            self.normalized_shape = tuple(ln.normalized_shape)

        def forward(self, x):
            dim = 1 if self.channels_first else -1
            amax = x.abs().amax(dim, keepdim=True)
            s = (amax * 0.125).clamp(min=1.0)
            xs = x / s
            if _Recorder.active is not None:
                _Recorder.active.add("layer_norm", _ln_stats(x, dim, s))
            mu = xs.mean(dim, keepdim=True)
            d = xs - mu
            var = (d * d).mean(dim, keepdim=True)
            y = d * torch.rsqrt(var + self.eps / (s * s))  # (x-μ)/S / sqrt(var/S² + eps/S²) == LayerNorm(x)
            if self.weight is not None:
                if self.channels_first:
                    y = y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)
                else:
                    y = y * self.weight + self.bias
            return y

    return SafeLayerNorm


def safe_layernorm_class():
    """The SafeLayerNorm nn.Module class (built on first use, so this module imports without torch)."""
    global _SAFE_LN_CLASS
    if _SAFE_LN_CLASS is None:
        _SAFE_LN_CLASS = _make_safe_ln_class()
    return _SAFE_LN_CLASS


def replace_layernorms(module) -> int:
    """Swap every nn.LayerNorm (and rfdetr's channels-first projector LayerNorm) for SafeLayerNorm, in place."""
    from torch import nn

    cls = safe_layernorm_class()
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, cls):
                continue
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, cls(child, channels_first=False))
                n += 1
            elif type(child).__name__ == "LayerNorm" and type(child).__module__.endswith("projector"):
                setattr(parent, name, cls(child, channels_first=True))
                n += 1
    return n


def activation_maxima(module, inputs: Sequence[Any]) -> dict[str, Any]:
    """Run ``module(*inputs)`` and record, per LayerNorm/softmax site, the largest activation feeding it.

    Returns {"sites": {site: stats}, "layer_norm_max_abs_in", "layer_norm_max_abs_reduced", "layer_norm_max_sumsq",
    "softmax_max_abs_in", "fp16_overflow_sites"}: for a plain LayerNorm the reduction domain is x itself; for
    SafeLayerNorm it is x/S. A site overflows fp16 when its Σ(x−μ)² (or Σx²) exceeds 65504.
    """
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    rec = _Recorder()

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.layer_norm:
                shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
                x = args[0]
                dims = tuple(range(x.dim() - len(shape), x.dim()))
                xx = x.detach().float().flatten(dims[0]) if len(dims) > 1 else x
                rec.add("layer_norm", _ln_stats(xx, -1))
            elif func in (torch.softmax, F.softmax, torch.Tensor.softmax):
                x = args[0]
                rec.add("softmax", {"max_abs_in": float(x.detach().abs().max())})
            return func(*args, **kwargs)

    def pre(mod, _inp):
        rec.stack.append(names.get(id(mod), type(mod).__name__))

    def post(mod, _inp, _out):
        rec.stack.pop()

    names = {id(m): n for n, m in module.named_modules()}
    hooks = []
    for m in module.modules():
        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(post))
    _Recorder.active = rec
    try:
        with torch.no_grad(), Mode():
            module(*inputs)
    finally:
        _Recorder.active = None
        for h in hooks:
            h.remove()
    ln = [v for v in rec.sites.values() if v["kind"] == "layer_norm"]
    sm = [v for v in rec.sites.values() if v["kind"] == "softmax"]
    over = sorted(k for k, v in rec.sites.items() if v["kind"] == "layer_norm" and
                  max(v["max_sumsq"], v["max_sum_sq_raw"]) > FP16_MAX)
    return {"sites": rec.sites,
            "layer_norm_sites": len(ln),
            "layer_norm_max_abs_in": max((v["max_abs_in"] for v in ln), default=0.0),
            "layer_norm_max_abs_reduced": max((v["max_abs_reduced"] for v in ln), default=0.0),
            "layer_norm_max_sumsq": max((max(v["max_sumsq"], v["max_sum_sq_raw"]) for v in ln), default=0.0),
            "softmax_sites": len(sm),
            "softmax_max_abs_in": max((v["max_abs_in"] for v in sm), default=0.0),
            "fp16_overflow_sites": over}


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
    raise SystemExit("usage: python -m nailkit.gpu verdict|check FILE.tflite ...")


if __name__ == "__main__":
    _main(sys.argv[1:])


# ----------------------------------------------------------------------------------------------------------------
# the GPU export target: Graph A (image → proposal scores/boxes + memory), host top-k, Graph B (decoder + heads),
# host selection, Graph C (masks for the selected queries only)
# ----------------------------------------------------------------------------------------------------------------

GRAPH_NAMES = ("graph_a", "graph_b", "graph_c")
GRAPH_A_OUTPUTS = ("enc_logits", "enc_boxes", "memory")  # [1,HW,C+1], [1,HW,4] cxcywh (normalised), [1,HW,D]
GRAPH_B_INPUTS = ("memory", "ref_boxes")  # [1,HW,D], [1,Q,4] (the host's top-Q proposal boxes)
GRAPH_B_OUTPUTS = ("pred_boxes", "pred_logits", "query_features")  # [1,Q,4], [1,Q,C+1], [1,Q,D] (mask-head input)
GRAPH_C_INPUTS = ("memory", "query_features")  # [1,HW,D], [1,K,D] (the host's selected rows, zero-padded)
GRAPH_C_OUTPUTS = ("pred_masks",)  # [1,K,R/4,R/4] mask logits
DEFAULT_MASK_SLOTS = 16


def tanh_gelu(x):
    import torch

    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


def tent_grid_sample(value, loc):
    """Bilinear sampling (grid_sample, align_corners=False, zero padding) as a matmul with tent weights: no GATHER.

    value [N,C,H,W]; loc [N,L,P,2] in [0,1] (x, y) → [N,C,L,P]. Every tensor stays ≤ 4-D.
    """
    import torch

    n, c, h, w = value.shape
    _, lq, p, _ = loc.shape
    ix = (loc[..., 0] * w - 0.5).reshape(n, lq * p, 1)
    iy = (loc[..., 1] * h - 0.5).reshape(n, lq * p, 1)
    xs = torch.arange(w, dtype=value.dtype).reshape(1, 1, w)
    ys = torch.arange(h, dtype=value.dtype).reshape(1, 1, h)
    wx = torch.relu(1.0 - (ix - xs).abs())  # [N, LP, W]
    wy = torch.relu(1.0 - (iy - ys).abs())  # [N, LP, H]
    wm = (wy.unsqueeze(-1) * wx.unsqueeze(-2)).reshape(n, lq * p, h * w)
    out = torch.matmul(value.reshape(n, c, h * w), wm.transpose(1, 2))  # [N, C, LP]
    return out.reshape(n, c, lq, p)


def _msda_forward_gpu(self, query, reference_points, input_flatten, input_spatial_shapes=None,
                      input_level_start_index=None, input_padding_mask=None, input_spatial_shapes_hw=None):
    """MSDeformAttn for one feature level with every tensor ≤ 4-D and the tent-matmul sampler (same math)."""
    import torch

    bs, lq, _ = query.shape
    h, w = self._nailkit_hw
    nh, npnt, dm = self.n_heads, self.n_points, self.d_model
    hd = dm // nh
    value = self.value_proj(input_flatten)  # [bs, HW, dm]
    so = self.sampling_offsets(query).reshape(bs, lq, nh, npnt * 2).permute(0, 2, 1, 3).reshape(bs * nh, lq, npnt, 2)
    aw = self.attention_weights(query).reshape(bs, lq, nh, npnt)
    aw = torch.softmax(aw, -1).permute(0, 2, 1, 3).reshape(bs * nh, 1, lq, npnt)
    ref = reference_points.reshape(bs, lq, reference_points.shape[-1])  # n_levels == 1
    rxy = ref[..., :2].unsqueeze(1).repeat(1, nh, 1, 1).reshape(bs * nh, lq, 1, 2)
    if ref.shape[-1] == 4:
        rwh = ref[..., 2:].unsqueeze(1).repeat(1, nh, 1, 1).reshape(bs * nh, lq, 1, 2)
        loc = rxy + so * (0.5 / npnt) * rwh
    else:
        norm = torch.tensor([w, h], dtype=value.dtype).reshape(1, 1, 1, 2)
        loc = rxy + so / norm
    val = value.transpose(1, 2).reshape(bs * nh, hd, h, w)
    sampled = tent_grid_sample(val, loc)  # [bs*nh, hd, lq, npnt]
    out = (sampled * aw).sum(-1).reshape(bs, dm, lq).transpose(1, 2)
    return self.output_proj(out)


def _sine_embed_gpu(pos_tensor, dim: int = 128):
    """rfdetr's gen_sineembed_for_position with dim_t baked and the sin/cos interleave as a reshape (no POW,
    FLOOR_DIV or strided slices)."""
    import math

    import torch

    dim_t = torch.arange(dim, dtype=torch.float32)
    dim_t = (10000.0 ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / dim)).to(pos_tensor.dtype)
    inv = (2 * math.pi) / dim_t

    def one(e):
        p = e.unsqueeze(-1) * inv  # [bs, nq, dim]
        pr = p.reshape(p.shape[0], p.shape[1], dim // 2, 2)
        return torch.stack((pr[..., 0].sin(), pr[..., 1].cos()), -1).reshape(p.shape[0], p.shape[1], dim)

    parts = [one(pos_tensor[:, :, 1]), one(pos_tensor[:, :, 0])]
    if pos_tensor.shape[-1] == 4:
        parts += [one(pos_tensor[:, :, 2]), one(pos_tensor[:, :, 3])]
    return torch.cat(parts, dim=2)


def _windowed_embeddings_forward(self, pixel_values, bool_masked_pos=None):
    """WindowedDinov2WithRegistersEmbeddings.forward with the window partition in ≤ 4-D steps (same order)."""
    import torch

    b, _, hh, ww = pixel_values.shape
    emb = self.patch_embeddings(pixel_values)
    emb = torch.cat((self.cls_token.expand(b, -1, -1), emb), dim=1)
    emb = emb + self.interpolate_pos_encoding(emb, hh, ww)
    nwin = self.config.num_windows
    if nwin > 1:
        nh_, nw_ = hh // self.config.patch_size, ww // self.config.patch_size
        wh, wwp = nh_ // nwin, nw_ // nwin
        c = emb.shape[-1]
        cls_t, pix = emb[:, :1], emb[:, 1:]
        # original: [b, nh, nw, c] → [b*nwin, wh, nwin, wwp, c] → permute(0,2,1,3,4) → [b*nwin², wh*wwp, c]
        x = pix.reshape(b * nwin, wh, nwin, wwp * c)  # (window row, row in window, window col, [col, c])
        x = x.permute(0, 2, 1, 3)  # (window row, window col, row in window, [col, c])
        x = x.reshape(b * nwin * nwin, wh * wwp, c)
        emb = torch.cat((torch.cat([cls_t] * (nwin * nwin), dim=0), x), dim=1)
    if self.config.num_register_tokens > 0:
        emb = torch.cat((emb[:, :1], self.register_tokens.expand(emb.shape[0], -1, -1), emb[:, 1:]), dim=1)
    return self.dropout(emb)


def _window_reverse(hs, b: int, nh_: int, nw_: int, nwin: int):
    """[b*nwin², wh*wwp, c] → [b, nh, nw, c] in ≤ 4-D steps (inverse of the partition above)."""
    wh, wwp = nh_ // nwin, nw_ // nwin
    c = hs.shape[-1]
    x = hs.reshape(b * nwin, nwin, wh, wwp * c)
    x = x.permute(0, 2, 1, 3)  # [b*nwin, wh, nwin, wwp*c]
    return x.reshape(b, nh_, nw_, c)


def _windowed_backbone_forward(self, pixel_values, output_hidden_states=None, output_attentions=None,
                               return_dict=None):
    from transformers.modeling_outputs import BackboneOutput

    emb = self.embeddings(pixel_values)
    outs = self.encoder(emb, output_hidden_states=True, output_attentions=False, return_dict=True)
    b, _, hh, ww = pixel_values.shape
    nh_, nw_ = hh // self.config.patch_size, ww // self.config.patch_size
    nwin = self.config.num_windows
    maps = ()
    for stage, hs in zip(self.stage_names, outs.hidden_states):
        if stage in self.out_features:
            if self.config.apply_layernorm:
                hs = self.layernorm(hs)
            if self.config.reshape_hidden_states:
                hs = hs[:, self.num_register_tokens + 1:]
                hs = _window_reverse(hs, b, nh_, nw_, nwin) if nwin > 1 else hs.reshape(b, nh_, nw_, -1)
                hs = hs.permute(0, 3, 1, 2).contiguous()
            maps += (hs,)
    return BackboneOutput(feature_maps=maps, hidden_states=None, attentions=None)


ALL_PATCHES = ("gelu", "msda", "windowed_dinov2", "layernorm")


def _patch_for_gpu(net, resolution: int, *, safe_layernorm: bool = True,
                   patches: Iterable[str] = ALL_PATCHES) -> dict[str, int]:
    """Instance-level GPU patches on an export-mode LWDETR copy. Returns what was patched."""
    import types

    import torch
    from torch import nn

    class TanhGELU(nn.Module):
        def forward(self, x):
            return tanh_gelu(x)

    counts = {"gelu": 0, "msda": 0, "windowed_dinov2": 0, "layernorm": 0}
    hw = resolution // int(net.backbone[0].encoder.encoder.config.patch_size) if hasattr(
        net.backbone[0].encoder, "encoder") else None
    patches = set(patches)
    for parent in list(net.modules()) if "gelu" in patches else []:
        for name, child in list(parent.named_children()):
            tname = type(child).__name__
            if isinstance(child, nn.GELU) or tname in ("GELUActivation", "NewGELUActivation", "GELUTanh"):
                setattr(parent, name, TanhGELU())
                counts["gelu"] += 1
    for m in net.modules():
        tname = type(m).__name__
        if tname == "MSDeformAttn" and "msda" in patches:
            if int(m.n_levels) != 1:
                raise NotImplementedError("GPU target: deformable attention with more than one level")
            m._nailkit_hw = (hw, hw)
            m.forward = types.MethodType(_msda_forward_gpu, m)
            counts["msda"] += 1
        elif tname == "WindowedDinov2WithRegistersEmbeddings" and "windowed_dinov2" in patches:
            m.forward = types.MethodType(_windowed_embeddings_forward, m)
            counts["windowed_dinov2"] += 1
        elif tname == "WindowedDinov2WithRegistersBackbone" and "windowed_dinov2" in patches:
            m.forward = types.MethodType(_windowed_backbone_forward, m)
        elif tname in ("Dinov2WithRegistersSdpaSelfAttention",):
            pass  # SDPA lowers to ≤4-D BATCH_MATMUL/SOFTMAX in litert-torch
    # MLP activations held as functions (transformers' ACT2FN objects are modules, handled above); decoder layers
    # keep `self.activation` as a function attribute:
    for m in net.modules():
        act = getattr(m, "activation", None)
        if "gelu" in patches and act is not None and not isinstance(act, nn.Module) and \
                getattr(act, "__name__", "") == "gelu":
            m.activation = tanh_gelu
            counts["gelu"] += 1
    if safe_layernorm and "layernorm" in patches:
        counts["layernorm"] = replace_layernorms(net)
    return counts


class _GpuPatches:
    """Context: rfdetr's module-level sine embedding swapped for the GPU-clean one (restored on exit)."""

    def __enter__(self):
        import rfdetr.models.transformer as tr

        self._tr, self._orig = tr, tr.gen_sineembed_for_position
        tr.gen_sineembed_for_position = _sine_embed_gpu
        return self

    def __exit__(self, *exc):
        self._tr.gen_sineembed_for_position = self._orig
        return False


def gpu_patches() -> _GpuPatches:
    return _GpuPatches()


def build_gpu_graphs(rf, resolution: Optional[int] = None, *, mask_slots: int = DEFAULT_MASK_SLOTS,
                     safe_layernorm: bool = True, gpu_ops: bool = True, patches: Iterable[str] = ALL_PATCHES):
    """(graph_a, graph_b, graph_c) nn.Modules over a GPU-patched export-mode copy of the rfdetr network.

    * Graph A: NHWC image [1,R,R,3] → ``enc_logits`` [1,HW,C+1] (two-stage proposal class logits, every token),
      ``enc_boxes`` [1,HW,4] (proposal boxes, cxcywh normalised, every token: the box MLP is token-pointwise, so
      computing it for all tokens and gathering on the host equals rfdetr's gather-then-MLP), ``memory`` [1,HW,D].
    * host (``postprocess.select_proposals``): score = max over classes, top-Q tokens, their boxes → ``ref_boxes``.
    * Graph B: (memory, ref_boxes [1,Q,4]) → ``pred_boxes`` [1,Q,4], ``pred_logits`` [1,Q,C+1],
      ``query_features`` [1,Q,D] (the decoder output after the mask head's query MLP and projection).
    * host (``postprocess.select_mask_queries``): rfdetr's predict() selection → up to K query rows, zero-padded.
    * Graph C: (memory, query_features [1,K,D]) → ``pred_masks`` [1,K,R/4,R/4] mask logits for those rows only.

    ``gpu_ops=False`` keeps rfdetr's own ops (for checking the split alone against the one-graph model).
    """
    import torch
    from torch import nn

    from nailkit.model import export_module

    mod = export_module(rf, resolution)
    net = mod.inner
    res = mod.resolution
    if gpu_ops:
        meta_counts = _patch_for_gpu(net, res, safe_layernorm=safe_layernorm, patches=patches)
    else:
        meta_counts = {}
    tr = net.transformer
    d = int(tr.d_model)
    q = int(net.num_queries)
    hw = res // int(rf.model_config.patch_size)
    if not (tr.two_stage and net.bbox_reparam and tr.dec_layers > 0 and net.segmentation_head is not None):
        raise NotImplementedError("GPU target: needs a two-stage, bbox-reparam, segmentation rfdetr model")
    # image-independent proposal grid (rfdetr's gen_encoder_output_proposals, bbox_reparam: not unsigmoided)
    ys, xs = torch.meshgrid(torch.arange(hw, dtype=torch.float32), torch.arange(hw, dtype=torch.float32),
                            indexing="ij")
    cxcy = (torch.stack([xs, ys], -1).reshape(1, hw * hw, 2) + 0.5) / hw
    proposals = torch.cat([cxcy, torch.full_like(cxcy, 0.05)], -1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1)
    if not bool(valid.all()):
        raise NotImplementedError(f"GPU target: at {res} some proposals are invalid; the host would need the mask")

    class NHWC(nn.Module):
        def forward(self, x):
            return x.permute(0, 3, 1, 2)

    class GraphA(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = net.backbone
            self.tr = tr
            self.register_buffer("proposals", proposals, persistent=False)

        def forward(self, image_nhwc):
            x = image_nhwc.permute(0, 3, 1, 2)
            srcs = self.backbone(x)[0]
            memory = srcs[0].flatten(2).transpose(1, 2)  # [1, HW, D]
            om = self.tr.enc_output_norm[0](self.tr.enc_output[0](memory))
            enc_logits = self.tr.enc_out_class_embed[0](om)
            delta = self.tr.enc_out_bbox_embed[0](om)
            p = self.proposals
            enc_boxes = torch.cat([delta[..., :2] * p[..., 2:] + p[..., :2], delta[..., 2:].exp() * p[..., 2:]], -1)
            return enc_logits, enc_boxes, memory

    class GraphB(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.register_buffer("ss", torch.tensor([[hw, hw]], dtype=torch.long), persistent=False)
            self.register_buffer("lsi", torch.tensor([0], dtype=torch.long), persistent=False)

        def forward(self, memory, ref_boxes):
            n = self.net
            tgt = n.query_feat.weight[:q].unsqueeze(0)
            rp = n.refpoint_embed.weight[:q].unsqueeze(0)
            ref = torch.cat([rp[..., :2] * ref_boxes[..., 2:] + ref_boxes[..., :2],
                             rp[..., 2:].exp() * ref_boxes[..., 2:]], -1)
            hs, ref_out = n.transformer.decoder(tgt, memory, memory_key_padding_mask=None, pos=None,
                                                refpoints_unsigmoid=ref, level_start_index=self.lsi,
                                                spatial_shapes=self.ss, spatial_shapes_hw=[(hw, hw)],
                                                valid_ratios=None)[:2]
            delta = n.bbox_embed(hs)
            boxes = torch.cat([delta[..., :2] * ref_out[..., 2:] + ref_out[..., :2],
                               delta[..., 2:].exp() * ref_out[..., 2:]], -1)
            logits = n.class_embed(hs)
            sh = n.segmentation_head
            qf = sh.query_features_proj(sh.query_features_block(hs))
            return boxes, logits, qf

    class GraphC(nn.Module):
        def __init__(self):
            super().__init__()
            self.sh = net.segmentation_head

        def forward(self, memory, query_features):
            sh = self.sh
            src = memory.transpose(1, 2).reshape(1, d, hw, hw)
            t = res // sh.downsample_ratio
            sf = torch.nn.functional.interpolate(src, size=(t, t), mode="bilinear", align_corners=False)
            for blk in sh.blocks:
                sf = blk(sf)
            sf = sh.spatial_features_proj(sf)
            k = query_features.shape[1]
            masks = torch.matmul(query_features, sf.flatten(2)).reshape(1, k, t, t)
            return masks + sh.bias

    a, b, c = GraphA().eval(), GraphB().eval(), GraphC().eval()
    meta = {"resolution": res, "num_queries": q, "hidden_dim": d, "tokens": hw * hw, "mask_slots": int(mask_slots),
            "mask_size": res // int(net.segmentation_head.downsample_ratio),
            "num_logits": int(net.class_embed.out_features), "patched": meta_counts}
    for g in (a, b, c):
        g.nailkit_meta = meta
    return a, b, c


def example_inputs(meta: dict[str, Any]):
    """Example inputs (torch) for each graph, in the shapes the exported files take."""
    import torch

    r, d, t, q, k = meta["resolution"], meta["hidden_dim"], meta["tokens"], meta["num_queries"], meta["mask_slots"]
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(1, q, 4, generator=g) * 0.5 + 0.25
    boxes[..., 2:] = 0.05
    return {"graph_a": (torch.zeros(1, r, r, 3),),
            "graph_b": (torch.randn(1, t, d, generator=g), boxes),
            "graph_c": (torch.randn(1, t, d, generator=g), torch.randn(1, k, d, generator=g))}


def run_split_torch(graphs, x_nhwc, *, num_select: int = 200, threshold: float = 0.5, mask_slots: Optional[int] = None):
    """Graph A → host top-k → Graph B → host selection → Graph C in PyTorch. Returns numpy arrays."""
    import torch

    from nailkit.postprocess import select_mask_queries, select_proposals

    a, b, c = graphs
    meta = a.nailkit_meta
    k = int(mask_slots or meta["mask_slots"])
    with torch.no_grad(), gpu_patches():
        enc_logits, enc_boxes, memory = a(torch.as_tensor(x_nhwc))
        ref, idx = select_proposals(enc_logits.numpy()[0], enc_boxes.numpy()[0], meta["num_queries"])
        boxes, logits, qf = b(memory, torch.from_numpy(ref[None]))
        rows, qsel = select_mask_queries(logits.numpy()[0], qf.numpy()[0], num_select=num_select,
                                         threshold=threshold, slots=k)
        masks = c(memory, torch.from_numpy(rows[None]))
    return {"enc_logits": enc_logits.numpy(), "enc_boxes": enc_boxes.numpy(), "memory": memory.numpy(),
            "topk_indices": idx, "pred_boxes": boxes.numpy(), "pred_logits": logits.numpy(),
            "query_features": qf.numpy(), "mask_queries": qsel, "pred_masks": masks.numpy()}


# ----------------------------------------------------------------------------------------------------------------
# tiny probe models (hand-written flatbuffers): the checks above demonstrated in seconds, no converter needed
# ----------------------------------------------------------------------------------------------------------------

def write_probe_model(path: str | os.PathLike[str], kind: str = "clean") -> Path:
    """Write a tiny ``.tflite`` with a known verdict.

    * "clean": x[1,8,8,4] → ADD(const) → MUL(self) → out. Every op GPU-clean (1 subgraph, 2 ops).
    * "blocked": x → RESHAPE to 5-D → RESHAPE back → GATHER(axis 3, [0, 3]) → CAST to int32 → CAST to float → out;
      a 5-D tensor, a GATHER and a CAST to int: the GPU delegate refuses all but the last CAST.
    """
    import flatbuffers

    s = _schema()
    B = s.BuiltinOperator
    f32, i32 = s.TensorType.FLOAT32, s.TensorType.INT32
    bufs = [s.BufferT()]
    tensors: list = []

    def tensor(name, shape, ttype=f32, data=None):
        t = s.TensorT()
        t.name, t.shape, t.type = name, list(shape), ttype
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            bufs.append(b)
            t.buffer = len(bufs) - 1
        else:
            t.buffer = 0
        tensors.append(t)
        return len(tensors) - 1

    codes: list[int] = []
    ops = []

    def op(code, ins, outs, opt_type=0, opt=None):
        if code not in codes:
            codes.append(code)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), list(ins), list(outs)
        o.builtinOptionsType, o.builtinOptions = opt_type, opt
        ops.append(o)

    x = tensor("input", [1, 8, 8, 4])
    if kind == "clean":
        c = tensor("bias", [1, 1, 1, 4], data=np.arange(4, dtype=np.float32))
        y = tensor("sum", [1, 8, 8, 4])
        out = tensor("output", [1, 8, 8, 4])
        op(B.ADD, [x, c], [y], s.BuiltinOptions.AddOptions, s.AddOptionsT())
        op(B.MUL, [y, y], [out], s.BuiltinOptions.MulOptions, s.MulOptionsT())
    elif kind == "blocked":
        s5 = tensor("shape5", [5], i32, data=np.array([1, 2, 4, 8, 4], dtype=np.int32))
        s4 = tensor("shape4", [4], i32, data=np.array([1, 8, 8, 4], dtype=np.int32))
        r5 = tensor("r5", [1, 2, 4, 8, 4])
        r4 = tensor("r4", [1, 8, 8, 4])
        idx = tensor("indices", [2], i32, data=np.array([0, 3], dtype=np.int32))
        g = tensor("gathered", [1, 8, 8, 2])
        ci = tensor("as_int", [1, 8, 8, 2], i32)
        out = tensor("output", [1, 8, 8, 2])
        op(B.RESHAPE, [x, s5], [r5], s.BuiltinOptions.ReshapeOptions, _opts(s.ReshapeOptionsT(), newShape=[1, 2, 4, 8, 4]))
        op(B.RESHAPE, [r5, s4], [r4], s.BuiltinOptions.ReshapeOptions, _opts(s.ReshapeOptionsT(), newShape=[1, 8, 8, 4]))
        op(B.GATHER, [r4, idx], [g], s.BuiltinOptions.GatherOptions, _opts(s.GatherOptionsT(), axis=3, batchDims=0))
        op(B.CAST, [g], [ci], s.BuiltinOptions.CastOptions, _opts(s.CastOptionsT(), inDataType=f32, outDataType=i32))
        op(B.CAST, [ci], [out], s.BuiltinOptions.CastOptions, _opts(s.CastOptionsT(), inDataType=i32, outDataType=f32))
    else:
        raise ValueError(f"kind must be 'clean' or 'blocked', not {kind!r}")
    sg = s.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs, sg.operators, sg.name = tensors, [x], [out], ops, "main"
    m = s.ModelT()
    m.version = 3
    m.description = f"nailkit probe model ({kind})"
    oc = []
    for code in codes:
        c_ = s.OperatorCodeT()
        c_.builtinCode, c_.deprecatedBuiltinCode, c_.version = code, min(code, 127), 1
        oc.append(c_)
    m.operatorCodes, m.subgraphs, m.buffers = oc, [sg], bufs
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    tin, tout = s.TensorMapT(), s.TensorMapT()
    tin.name, tin.tensorIndex = "input", x
    tout.name, tout.tensorIndex = "output", out
    sig.inputs, sig.outputs = [tin], [tout]
    m.signatureDefs = [sig]
    b = flatbuffers.Builder(4096)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path = Path(path)
    path.write_bytes(bytes(b.Output()))
    return path


def _opts(obj, **kw):
    for k, v in kw.items():
        setattr(obj, k, v)
    return obj


# ----------------------------------------------------------------------------------------------------------------
# export (run in its own process: loads triton through litert_torch before anything imports tensorflow)
# ----------------------------------------------------------------------------------------------------------------

def export_gpu_graphs(checkpoint: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], *,
                      resolution: Optional[int] = None, mask_slots: int = DEFAULT_MASK_SLOTS,
                      class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Convert Graph A/B/C with litert-torch to ``out_dir/graph_{a,b,c}.tflite`` (fp32 weights; the GPU delegate
    picks fp16 or fp32 at run time), op-check each, and embed nailkit metadata in each. Returns a summary."""
    import time

    from nailkit._imports import load_triton_first

    load_triton_first()
    import litert_torch
    import torch

    from nailkit import tflite_metadata as tm
    from nailkit.model import load_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rf = load_model(checkpoint)
    graphs = build_gpu_graphs(rf, resolution, mask_slots=mask_slots)
    meta = graphs[0].nailkit_meta
    ex = example_inputs(meta)
    names = list(class_names or getattr(rf.model, "class_names", None) or [])
    io_doc = {
        "graph_a": ([("image", [1, meta["resolution"], meta["resolution"], 3])],
                    [("enc_logits", "two-stage proposal class logits, every token"),
                     ("enc_boxes", "proposal boxes cxcywh normalised, every token"),
                     ("memory", "encoder memory, input of graphs B and C")]),
        "graph_b": ([("memory", [1, meta["tokens"], meta["hidden_dim"]]), ("ref_boxes", [1, meta["num_queries"], 4])],
                    [("pred_boxes", "cxcywh normalised"), ("pred_logits", "class logits, sigmoid per (query, class)"),
                     ("query_features", "mask-head query features, rows for graph C")]),
        "graph_c": ([("memory", [1, meta["tokens"], meta["hidden_dim"]]),
                     ("query_features", [1, meta["mask_slots"], meta["hidden_dim"]])],
                    [("pred_masks", f"mask logits at 1/4 resolution for the {meta['mask_slots']} slots")]),
    }
    host = {"graph_a->graph_b": "postprocess.select_proposals(enc_logits[0], enc_boxes[0], num_queries)",
            "graph_b->graph_c": "postprocess.select_mask_queries(pred_logits[0], query_features[0], slots=K)",
            "final": "postprocess.postprocess(RawOutputs(boxes, logits, masks[0], mask_queries=q), size)"}
    summary: dict[str, Any] = {"meta": meta, "graphs": {}}
    for name, g in zip(GRAPH_NAMES, graphs):
        t0 = time.time()
        path = out / f"{name}.tflite"
        with torch.no_grad(), gpu_patches():
            litert_torch.convert(g, ex[name]).export(str(path))
        oc = op_check(path)
        ins, outs = io_doc[name]
        doc = tm.build_metadata(class_names=names, resolution=meta["resolution"],
                                input_name=ins[0][0], outputs=[{"name": n, "meaning": m} for n, m in outs],
                                graph={"name": name, "of": list(GRAPH_NAMES), "inputs": [list(i) for i in ins],
                                       "host_steps": host, **meta},
                                extra={"op_check": {"ok": oc.ok, "n_ops": oc.n_ops}})
        tm.embed_metadata(path, doc, labels=names)
        summary["graphs"][name] = {"path": str(path), "convert_s": time.time() - t0, "op_check": oc.summary()}
    return summary
