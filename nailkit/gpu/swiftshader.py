"""SwiftShader (Vulkan on the CPU) for LiteRT's WebGPU accelerator: is the GPU check possible here, and the child
process environment that runs it.

* ``gpu_unavailable_reason()`` says in one line why the GPU delegate cannot run here (ai-edge-litert without its WebGPU
  accelerator, no SwiftShader ICD, no Vulkan loader), or None when it can.
* ``gpu_env(base, runtime_dir)`` is an environment for a child process: SwiftShader's ICD (Debian's ``chromium``
  package; ``$NAILKIT_VK_ICD`` first) as the only Vulkan driver and a private ``XDG_RUNTIME_DIR``, so the driver
  settings never leak into the caller.

Used by the delegate's verdict (``nailkit.gpu.delegate``) and the GPU chain run (``nailkit.gpu.verify``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

SWIFTSHADER_ICDS = (
    "/usr/lib/chromium/vk_swiftshader_icd.json",  # Debian/Ubuntu `chromium`
    "/usr/lib/chromium-browser/vk_swiftshader_icd.json",
    "/usr/share/vulkan/icd.d/vk_swiftshader_icd.json",
)
VULKAN_LOADER = "libvulkan.so.1"


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
