"""The native CPU chunk epilogue (grpo_kernels/csrc/chunk_epilogue.cpp): build once per machine, load, dispatch.

torch_ops.chunk_stats / chunk_dlogits_ call `chunk_stats` / `chunk_dlogits_` here first; these return None when
the native path does not apply (not a CPU fp32/fp64 buffer with unit column stride, a 16-bit out_dtype, the
extension turned off with GRPO_KERNELS_NATIVE=0, or it could not be built), and the PyTorch path runs instead.
The math, and its PyTorch statement, is in torch_ops.

Build: torch.utils.cpp_extension (g++ and ninja) into <torch extensions dir>/grpo_kernels_native_<key>, where the
key hashes the source, the flags, the compiler's name, torch's and Python's versions and the CPU's instruction-set
flags (the code is built with -march=native). A built library is loaded directly without invoking the compiler; one
line is printed when it builds, one warning when it cannot (then the PyTorch path is used). A failed build leaves
build-failed.txt in that folder so that later processes warn without building again. The source ships inside the
package (package data), so an installed wheel builds it as a checkout does.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from . import env_flags

Tensor = torch.Tensor

_SOURCE = Path(__file__).resolve().parent / "csrc" / "chunk_epilogue.cpp"
_NAME = "grpo_kernels_native"
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++17"]
_LDFLAGS = ["-fopenmp"]
_DTYPES = (torch.float32, torch.float64)


def enabled() -> bool:
    """GRPO_KERNELS_NATIVE=0 (or false / off / no) turns the native path off; it is on by default."""
    return env_flags.native_enabled()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.machine() + platform.processor()


def _build_dir() -> Path:
    from torch.utils.cpp_extension import get_default_build_root
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_CFLAGS + _LDFLAGS).encode(), torch.__version__.encode(),
                 _cpu_flags().encode(), sys.version.encode(), _cxx().encode()):
        key.update(part)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's own extensions
    return Path(root) / f"{_NAME}_{key.hexdigest()[:16]}"


def _warn(reason: str) -> None:
    warnings.warn(f"grpo_kernels: native CPU epilogue unavailable ({reason}); using the PyTorch path",
                  RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def load() -> Optional[str]:
    """Build (first time on this machine) and load the extension; its library path, or None (one warning) when it
    cannot be built or loaded. Cached for the process."""
    if not _SOURCE.is_file():
        _warn(f"{_SOURCE} is missing")
        return None
    try:
        build_dir = _build_dir()
        lib, failed = build_dir / f"{_NAME}.so", build_dir / "build-failed.txt"
        if lib.is_file():
            torch.ops.load_library(str(lib))
            return str(lib)
        if failed.is_file():  # do not pay for the same failing build in every process
            _warn(f"an earlier build failed: {failed.read_text().strip()}; delete {build_dir} to retry")
            return None
        cxx = _cxx()
        if shutil.which(cxx) is None:
            _warn(f"no C++ compiler: `{cxx}` not found")
            return None
        if not _ninja_on_path():
            _warn("no `ninja` (pip install ninja)")
            return None
        from torch.utils.cpp_extension import load as build
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"grpo_kernels: building the native CPU epilogue once for this machine in {build_dir} ...",
              file=sys.stderr, flush=True)
        try:
            build(_NAME, [str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS,
                  build_directory=str(build_dir), is_python_module=False, verbose=False)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {_first_error(str(exc))}"
            failed.write_text(reason + "\n")
            _warn(reason)
            return None
        return str(lib)
    except Exception as exc:  # any other failure (loading included): fall back, say why in one line
        _warn(f"{type(exc).__name__}: {_first_error(str(exc))}")
        return None


def _ninja_on_path() -> bool:
    """torch runs `ninja` from PATH; the pip package's binary may sit in a bin folder that is not on it."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except (ImportError, AttributeError):
        return False
    return shutil.which("ninja") is not None


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def _first_error(text: str) -> str:
    """The compiler's first `error:` line of a build log (else its last line), shortened to one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or ["(no message)"]
    line = next((ln for ln in lines if "error:" in ln), lines[-1])
    return line[:300]


def available() -> bool:
    return load() is not None


def _applies(logits: Tensor, targets: Tensor) -> bool:
    return (enabled() and logits.device.type == "cpu" and not (logits.requires_grad and torch.is_grad_enabled()) and logits.dtype in _DTYPES and logits.dim() == 2
            and logits.shape[1] > 0 and (logits.stride(1) == 1 or logits.shape[1] == 1)
            and targets.device.type == "cpu" and targets.dim() == 1 and targets.shape[0] == logits.shape[0]
            and targets.dtype in (torch.int32, torch.int64) and available())


def _unit_cols(logits: Tensor) -> Tensor:
    return logits if logits.stride(1) == 1 else logits.as_strided(logits.shape, (logits.stride(0), 1))


def _rowvec(t: Tensor, like: Tensor) -> Tensor:
    return t.to(device="cpu", dtype=like.dtype).contiguous()


def chunk_stats(logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool):
    """torch_ops.chunk_stats natively, or None when the native path does not apply."""
    if not _applies(logits, targets):
        return None
    lse, logp, ent = torch.ops.grpo_native.chunk_stats(_unit_cols(logits), targets.contiguous(),
                                                       1.0 / temperature, bool(return_entropy))
    return lse, logp, (ent if return_entropy else None)


def chunk_dlogits_(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, temperature: float,
                   entropy: Optional[Tensor] = None, grad_entropy: Optional[Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
    """torch_ops.chunk_dlogits_ natively (in place, result in `logits`), or None when the native path does not
    apply (a 16-bit out_dtype included)."""
    if out_dtype is not None and out_dtype != logits.dtype:
        return None
    if not _applies(logits, targets):
        return None
    M = logits.shape[0]
    rows = [lse, grad] + ([entropy, grad_entropy] if grad_entropy is not None else [])
    if any(t is None or t.dim() != 1 or t.shape[0] != M for t in rows):
        return None  # the PyTorch path raises its own error
    ent = gent = None
    if grad_entropy is not None:
        ent, gent = _rowvec(entropy, logits), _rowvec(grad_entropy, logits)
    torch.ops.grpo_native.chunk_dlogits_(_unit_cols(logits), targets.contiguous(), _rowvec(lse, logits),
                                         _rowvec(grad, logits), 1.0 / temperature, ent, gent)
    return logits
