"""The selective scan compiled for the CPU: same arguments and results as :func:`.scan.selective_scan_ref`.

The PyTorch chunked path (:mod:`.scan_chunked`) spends most of its time in elementwise ops launched from
Python, each a pass over memory; here one C++ loop (``scan_cpu.cpp``) runs the recurrence with the states in
cache, softplus(dt + bias), the D skip and the z gate fused, and OpenMP over (batch, block of 32 channels).

The library is built on first use with the system C++ compiler (``$CXX``, else ``c++``/``g++``/``clang++``),
into ``$TORCH_EXTENSIONS_DIR/blackmamba_scan_cpu`` (default ``~/.cache/torch_extensions/...``) under a name
that hashes the source, the flags, the compiler's version and the CPU's features, so every build is made once
and reused by later processes. The build takes about 1.5 s: the file includes no PyTorch headers and is called
through ctypes (``torch.utils.cpp_extension`` would need ninja, which a plain Python environment lacks, and
compiles the PyTorch headers). A file lock serialises concurrent builds and the result is renamed into place.
Without a compiler, or when the build fails, one warning says why and the dispatcher runs the PyTorch path.

Forward and backward (an autograd Function whose backward recomputes the states per channel block), inputs in
fp32 or bf16. :func:`.scan.selective_scan` calls it on CPU tensors under the "torch"/"auto" backend unless
``use_settings(compiled_cpu_scan=False)``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .scan import _check_inputs
from .settings import get_settings

SOURCE = Path(__file__).with_name("scan_cpu.cpp")
ABI_VERSION = 1
# Tried in order: the first that builds is kept (-march=native for the vector width of this CPU; OpenMP for
# the threads; a compiler without either still gives a correct, slower library).
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math"]
_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


class _ScanArgs(ctypes.Structure):
    # Mirrors ``struct ScanArgs`` in scan_cpu.cpp.
    _fields_ = [
        (name, ctypes.c_int64)
        for name in (
            "batch",
            "length",
            "d_inner",
            "d_state",
            "u_sb",
            "u_sl",
            "delta_sb",
            "delta_sl",
            "z_sb",
            "z_sl",
            "B_sb",
            "B_sl",
            "C_sb",
            "C_sl",
        )
    ] + [(name, ctypes.c_int32) for name in ("in_bf16", "out_bf16", "delta_softplus", "threads")]
    _fields_ += [
        (name, ctypes.c_void_p)
        for name in ("u", "delta", "z", "B", "C", "A", "D", "delta_bias", "initial_state", "y", "final_state")
    ]


def find_compiler() -> str | None:
    """Path of the C++ compiler the build uses, or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> Path:
    """Where built libraries live: ``$TORCH_EXTENSIONS_DIR`` as torch's own extensions do, else the user cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root) / "blackmamba_scan_cpu"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "torch_extensions" / "blackmamba_scan_cpu"


def _cpu_features() -> str:
    """The CPU's feature flags (-march=native builds differ between CPUs sharing a home directory)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build_key(compiler: str, flags: list[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    parts = [SOURCE.read_bytes().hex(), compiler, version, " ".join(flags), platform.machine(), _cpu_features()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    """Build into a temporary file next to ``target`` and rename it into place (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem + ".", suffix=".tmp.so")
    os.close(fd)
    try:
        cmd = [compiler, *flags, *COMMON_FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _locked(path: Path):
    """An exclusive lock on ``path`` across processes (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return open(os.devnull, "w")
    handle = open(path, "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def _load(compiler: str) -> ctypes.CDLL:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        target = folder / f"scan_cpu_{_build_key(compiler, flags)}.so"
        with _locked(folder / "build.lock"):
            if not target.exists():
                try:
                    _compile(compiler, flags, target)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    errors.append(str(e))
                    continue
        lib = ctypes.CDLL(str(target))
        if lib.bm_scan_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{target} has ABI {lib.bm_scan_abi_version()}, expected {ABI_VERSION}")
        lib.bm_scan_fwd.argtypes = [ctypes.POINTER(_ScanArgs)]
        lib.bm_scan_bwd.argtypes = [ctypes.POINTER(_ScanArgs), ctypes.POINTER(_ScanGrads)]
        lib.bm_scan_fwd.restype = lib.bm_scan_bwd.restype = ctypes.c_int
        return lib
    raise RuntimeError("; ".join(errors))


def library() -> ctypes.CDLL | None:
    """The compiled scan, built on the first call of the process; None (after one warning) when it cannot be."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            compiler = find_compiler()
            if compiler is None:
                _failure = "no C++ compiler found (set CXX, or install g++)"
            else:
                try:
                    _library = _load(compiler)
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    _failure = f"building {SOURCE.name} failed: {e}"
            if _failure is not None:
                warnings.warn(f"blackmamba: compiled CPU scan unavailable, using PyTorch's: {_failure}", stacklevel=3)
    return _library


def unavailable_reason() -> str | None:
    """Why :func:`library` gives None (None once it is built)."""
    library()
    return _failure


def supports(u: Tensor, delta: Tensor, B: Tensor, C: Tensor, z: Tensor | None, *others: Tensor | None) -> bool:
    """Whether the compiled scan takes these inputs: CPU tensors, u in fp32 or bf16."""
    tensors = [t for t in (u, delta, B, C, z, *others) if t is not None]
    return u.dtype in _DTYPES and all(t.device.type == "cpu" for t in tensors)


def applies(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
) -> bool:
    """Whether :func:`.scan.selective_scan` should run the compiled scan on these inputs: the setting is on,
    :func:`supports` holds, and the library is built (building it now if this is the first call)."""
    if not get_settings().compiled_cpu_scan or not supports(u, delta, B, C, z, A, D, delta_bias, initial_state):
        return False
    return library() is not None


def _rows(t: Tensor) -> Tensor:
    """``t`` (B, L, X) with unit stride along X (a column slice of a wider matrix stays a view)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = True,
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The compiled scan, with gradients for every input; see :func:`.scan.selective_scan_ref` for shapes.
    Raises RuntimeError when the library cannot be built and ValueError for inputs it does not take
    (:func:`supports`)."""
    _check_inputs(u, delta, A, B, C, initial_state)
    if not supports(u, delta, B, C, z, A, D, delta_bias, initial_state):
        raise ValueError(
            f"selective_scan_cpu takes CPU tensors with u in float32 or bfloat16; got u {u.dtype} on {u.device}"
        )
    if library() is None:
        raise RuntimeError(f"compiled CPU scan unavailable: {_failure}")
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, final = _CompiledScan.apply(*inputs, delta_softplus)
    else:
        y, final = _forward(inputs, delta_softplus, return_final_state)
    return (y, final) if return_final_state else y


class _ScanGrads(ctypes.Structure):
    # Mirrors ``struct ScanGrads`` in scan_cpu.cpp.
    _fields_ = [("partials", ctypes.c_int64)] + [
        (name, ctypes.c_void_p)
        for name in ("gy", "g_final", "du", "ddelta", "dz", "dA", "dD", "ddelta_bias", "dB", "dC", "dh0")
    ]


def _pointer(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _arguments(inputs: tuple[Tensor | None, ...], delta_softplus: bool) -> tuple[_ScanArgs, list[Tensor | None]]:
    """The kernel's arguments (y and the final state left null) and the tensors they point into."""
    u, delta, A, B, C, D, z, delta_bias, initial_state = inputs
    batch, length, d_inner = u.shape
    # bf16 is read as bf16 only when every sequence input is bf16; any other mix is read in fp32.
    streams = [t for t in (u, delta, B, C, z) if t is not None]
    in_dtype = torch.bfloat16 if all(t.dtype == torch.bfloat16 for t in streams) else torch.float32
    u_, delta_, B_, C_ = (_rows(t.detach().to(in_dtype)) for t in (u, delta, B, C))
    z_ = None if z is None else _rows(z.detach().to(in_dtype))
    f32 = [None if t is None else t.detach().float().contiguous() for t in (A, D, delta_bias, initial_state)]
    args = _ScanArgs(
        batch,
        length,
        d_inner,
        A.shape[1],
        *(s for t in (u_, delta_, z_ if z_ is not None else u_, B_, C_) for s in t.stride()[:2]),
        int(in_dtype == torch.bfloat16),
        int(u.dtype == torch.bfloat16),
        int(delta_softplus),
        torch.get_num_threads(),
        *(_pointer(t) for t in (u_, delta_, z_, B_, C_, *f32)),
    )
    return args, [u_, delta_, z_, B_, C_, *f32]


def _forward(
    inputs: tuple[Tensor | None, ...], delta_softplus: bool, final_state: bool
) -> tuple[Tensor, Tensor | None]:
    u, A, initial_state = inputs[0], inputs[2], inputs[8]
    batch, length, d_inner = u.shape
    args, keep = _arguments(inputs, delta_softplus)
    y = torch.empty(batch, length, d_inner, dtype=u.dtype)
    final = torch.empty(batch, d_inner, A.shape[1], dtype=torch.float32) if final_state else None
    if length == 0 and final is not None:  # the kernel writes the final state only after a step
        final.copy_(torch.zeros_like(final) if initial_state is None else initial_state.detach())
        return y, final
    args.y, args.final_state = _pointer(y), _pointer(final)
    if _library.bm_scan_fwd(ctypes.byref(args)) != 0:
        raise RuntimeError(f"bm_scan_fwd: no kernel for {u.dtype} output from these input dtypes")
    del keep
    return y, final


class _CompiledScan(torch.autograd.Function):
    """Forward as :func:`_forward`; backward recomputes the states (``bm_scan_bwd`` in scan_cpu.cpp)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
        inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
        ctx.save_for_backward(*inputs)
        ctx.delta_softplus = delta_softplus
        return _forward(inputs, delta_softplus, True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, g_final):
        inputs = ctx.saved_tensors
        u, delta, A, B, C, D, z, delta_bias, initial_state = inputs
        batch, length, d_inner = u.shape
        n = A.shape[1]
        args, keep = _arguments(inputs, ctx.delta_softplus)
        parts = args.threads
        gy = torch.zeros(u.shape) if gy is None else gy.float().contiguous()
        g_final = None if g_final is None else g_final.float().contiguous()
        du, ddelta = torch.empty(u.shape), torch.empty(u.shape)
        dz = None if z is None else torch.empty(u.shape)
        dA, dh0 = torch.zeros(parts, d_inner, n), torch.empty(batch, d_inner, n)
        dD, dbias = torch.zeros(parts, d_inner), torch.zeros(parts, d_inner)
        dB, dC = torch.zeros(parts, batch, length, n), torch.zeros(parts, batch, length, n)
        grads = _ScanGrads(parts, *(_pointer(t) for t in (gy, g_final, du, ddelta, dz, dA, dD, dbias, dB, dC, dh0)))
        if length == 0:
            dh0 = torch.zeros_like(dh0) if g_final is None else g_final
        else:
            _library.bm_scan_bwd(ctypes.byref(args), ctypes.byref(grads))
        del keep

        def cast(g: Tensor | None, like: Tensor | None) -> Tensor | None:
            return None if like is None or g is None else g.to(like.dtype)

        return (
            cast(du, u),
            cast(ddelta, delta),
            cast(dA.sum(0), A),
            cast(dB.sum(0), B),
            cast(dC.sum(0), C),
            cast(dD.sum(0), D),
            cast(dz, z),
            cast(dbias.sum(0), delta_bias),
            cast(dh0, initial_state),
            None,
        )
