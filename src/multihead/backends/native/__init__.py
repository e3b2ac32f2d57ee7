"""The native CPU kernel of the block-sparse backend: built once per machine, cached, optional.

``kernel()`` returns the compiled extension (``blocksparse.cpp``, ``select.cpp`` for ``TopK``'s
choice of keys, ``cluster.cpp`` for ``Routing``'s assignment, ``pool.cpp`` for its output buffers and
``peak.cpp`` for the cores' multiply-add rate, beside this file), building it on first
use with ``torch.utils.cpp_extension`` (a C++ compiler and ninja) into a cache folder keyed by the
sources, torch's version and the CPU's vector extensions, so a second process only loads it.
``status()`` says whether it is available and, if not, why: no compiler, a failed build, or
``MULTIHEAD_NATIVE=0`` in the environment. Without it the block-sparse backend runs its tiles in
plain PyTorch; ``multihead.explain`` says which path ran.

Outputs of 1 MiB or more (out, dq, dk, dv) are kept for reuse when their tensors die, so that a
training loop does not map, fault in and unmap them on every call: up to
``MULTIHEAD_NATIVE_POOL_MIB`` idle (default an eighth of the machine's memory, at most 4 GiB; 0
turns this off). ``idle_memory()`` says how much is held, ``release_memory()`` hands it back to
the OS.

``python -m multihead.backends.native`` builds it (``make setup`` does) and prints the status.
``MULTIHEAD_NATIVE_DEBUG=assert`` (or ``asan``) builds a checked copy beside it, for the tests.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(name)
            for name in ("blocksparse.cpp", "select.cpp", "cluster.cpp", "pool.cpp", "peak.cpp")]
_lock = threading.Lock()
_state: dict = {}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (empty elsewhere)."""
    fields: dict[str, str] = {}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return fields
    for line in lines:
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty elsewhere)."""
    return set(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers ("" where ``/proc/cpuinfo`` is
    missing). The numbers tell apart cores that share a name and differ in speed: an "AMD EPYC" of
    family 25 (Zen 4) runs an AVX-512 multiply-add in two halves, one of family 26 (Zen 5) in one."""
    info = _cpuinfo()
    name = info.get("model name", "")
    if name and "cpu family" in info and "model" in info:
        name += f", family {info['cpu family']} model {info['model']}"
    return name


def _vector_flags(flags: set[str]) -> list[str]:
    """Compiler flags for ATen's vector types at the widest width this CPU runs."""
    f16c = ["-mf16c"] if "f16c" in flags else []  # one-instruction float16 -> float32 scalars
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        bf16 = ["-mavx512bf16"] if "avx512_bf16" in flags else []  # bf16 pair products (vdpbf16ps)
        vnni = ["-mavx512vnni"] if "avx512_vnni" in flags else []  # int8 quad products (vpdpbusd)
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", *f16c, *bf16, *vnni,
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma", *f16c, "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def _cache_root() -> Path:
    root = os.environ.get("MULTIHEAD_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "multihead"


def build_flags(debug: str = "") -> list[str]:
    """Compiler flags; ``debug``: "" (release), "assert" (bounds-checked standard containers) or
    "asan" (also AddressSanitizer: run Python with libasan preloaded, see ``make test-native-asan``)."""
    # -fopenmp: ATen's parallel_for is inlined here, its OpenMP pragma runs serially without it
    flags = ["-O3", "-std=c++17", "-fopenmp", *_vector_flags(cpu_flags())]
    if debug:
        flags += ["-g", "-D_GLIBCXX_ASSERTIONS", "-fno-omit-frame-pointer"]
    if debug == "asan":
        flags += ["-fsanitize=address"]
    return flags


def _build(debug: str):
    flags = build_flags(debug)
    source = b"".join(path.read_bytes() for path in _SOURCES)
    tag = hashlib.sha256(source + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:12]
    name = f"multihead_blocksparse_{tag}"
    folder = _cache_root() / "native" / name
    folder.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    return cpp_extension.load(name=name, sources=[str(path) for path in _SOURCES], extra_cflags=flags,
                              extra_ldflags=["-fopenmp"] + (["-fsanitize=address"] if debug == "asan" else []),
                              build_directory=str(folder), verbose=False)


def _missing_tools() -> str | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (apt-get install ninja-build, or pip install ninja)"
    return None


def status() -> tuple[object | None, str | None]:
    """``(module, None)`` when the kernel is available, else ``(None, why not)``. Builds on the
    first call (under a minute); later calls return the cached answer."""
    disabled = os.environ.get("MULTIHEAD_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")
    if disabled:
        return None, "the native kernel is disabled (MULTIHEAD_NATIVE=0)"
    debug = os.environ.get("MULTIHEAD_NATIVE_DEBUG", "").strip().lower()
    if debug not in ("", "assert", "asan"):
        return None, f"MULTIHEAD_NATIVE_DEBUG must be 'assert' or 'asan', not {debug!r}"
    with _lock:
        if debug not in _state:
            why = _missing_tools()
            module = None
            if why is None:
                try:
                    module = _build(debug)
                except Exception as error:  # a compiler error, a missing header: keep the fallback
                    lines = str(error).strip().splitlines()
                    first = next((ln for ln in lines if "error" in ln), lines[-1] if lines else type(error).__name__)
                    why = f"the native kernel failed to build ({first.strip()})"
            _state[debug] = (module, why)
        return _state[debug]


def kernel():
    """The compiled extension, or None (see ``status``)."""
    return status()[0]


def _loaded():
    """The extension if this process has loaded it already (never builds)."""
    return next((module for module, _ in _state.values() if module is not None), None)


def idle_memory() -> int:
    """Bytes of the kernel's output buffers held for reuse, idle (0 when the kernel is not loaded)."""
    module = _loaded()
    return module.pool_idle_bytes() if module is not None else 0


def release_memory() -> int:
    """Hand the kernel's idle output buffers back to the OS (as ``torch.cuda.empty_cache`` does on
    a GPU); the bytes released."""
    module = _loaded()
    return module.release_pool() if module is not None else 0


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor; on CPU, once the kernel is loaded, from its kept buffers: a fresh
    32 MiB tensor costs about 10 ms of page faults on this machine, a kept one none (for the large
    temporaries around the kernel, such as routing's permuted frame)."""
    module = _loaded() if torch.device(device).type == "cpu" else None
    if module is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return module.empty(list(shape), dtype)


def contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``, copied into a kept buffer (``empty``) when it is not contiguous: a run of
    heads split from a batch of two or more, whose copy would otherwise fault in fresh pages."""
    return x if x.is_contiguous() else empty(x.shape, x.dtype, x.device).copy_(x)


def describe() -> str:
    """One line on the kernel: available (with the CPU features it uses) or why not."""
    module, why = status()
    if module is None:
        return f"native kernel unavailable: {why}"
    cpu = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"))
    pairs = "; bf16 pair products (AVX-512 BF16)" if module.bf16_pairs() else ""
    screens = list(module.screens())
    pairs += f"; top-k choice screened by {' or '.join(screens)} products" if screens else ""
    limit = module.pool_limit_bytes()
    kept = f"; outputs kept for reuse, up to {limit >> 20} MiB idle" if limit else "; outputs not kept for reuse"
    name = cpu_name()
    on = f" on {name}" if name else ""
    return f"native kernel available (CPU: {', '.join(cpu) or 'baseline'}{on}{pairs}{kept})"


def main() -> int:
    line = describe()
    print(line)
    return 0 if kernel() is not None else 1


if __name__ == "__main__":
    sys.exit(main())
