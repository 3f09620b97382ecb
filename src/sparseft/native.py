"""The compiled CPU SDDMM (``csrc/sddmm.c``): built on first use, loaded with ctypes.

torch has no CPU kernel that reads the SDDMM's operands as autograd hands them over
(token-major); ``sampled_addmm`` needs both transposed in memory first, and on 2 cores that
round trip was most of sparseft's step overhead. The C kernel transposes one cache-sized
block of tokens at a time instead. It is compiled with the system C compiler (``$CC``,
else Python's, else ``cc``) into ``$SPARSEFT_CACHE/native`` (or a temp folder only this
user can write), keyed on the source, the compiler and the CPU, once per machine (about a
second); with no compiler, or a failed build, sparseft warns once and keeps the
pure-torch SDDMM. ``SPARSEFT_NATIVE=0`` turns the
kernel off, ``SPARSEFT_NATIVE=1`` makes a failed build an error.

The kernel's OpenMP regions run on torch's own thread pool: torch's libgomp.so.1 is
loaded first (this module imports torch), and the kernel's reference to that soname
resolves to it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("csrc") / "sddmm.c"
ABI = 2
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"],
    ["-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11"],  # compilers without -march=native
    ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"],  # without OpenMP (Apple clang): one thread
    ["-O3", "-fPIC", "-shared", "-std=c11"],
)
BUILD_TIMEOUT_S = 300

_LOCK = threading.Lock()
_state: dict[str, object] = {}


class NativeBuildError(RuntimeError):
    """The compiled kernel could not be built or loaded (and SPARSEFT_NATIVE=1 asks for it)."""


def _setting() -> str:
    value = os.environ.get("SPARSEFT_NATIVE", "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "require"):
        return "require"
    if value in ("", "auto"):
        return "auto"
    raise ValueError(f"SPARSEFT_NATIVE={value!r}: use 0 (off), 1 (required) or auto")


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def cache_dir() -> Path:
    """``$SPARSEFT_CACHE/native`` (default ``~/.cache/sparseft/native``), beside the converted models."""
    return Path(os.environ.get("SPARSEFT_CACHE") or Path.home() / ".cache" / "sparseft").expanduser() / "native"


def _temp_dir() -> Path:
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"sparseft-native-{user}"


def _trusted(folder: Path) -> bool:
    """A shared temp folder is used only if it is this user's and nobody else can write
    to it: a library loaded from it runs as this process."""
    if folder != _temp_dir() or not hasattr(os, "getuid"):
        return True
    try:
        st = folder.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _cache_dirs() -> list[Path]:
    """Where a built kernel is looked for, and built: the cache, else a per-user temp folder."""
    return [cache_dir(), _temp_dir()]


def _writable_dir() -> Path:
    for folder in _cache_dirs():
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK) and _trusted(folder):
            return folder
    raise NativeBuildError(f"no writable folder for the compiled kernel (tried {', '.join(map(str, _cache_dirs()))})")


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep))) + platform.machine()


def _compiler_version(cc: list[str]) -> str:
    try:
        return subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(cc: list[str]) -> Path:
    source = SOURCE.read_bytes()
    version = _compiler_version(cc)
    if not version:
        raise NativeBuildError(f"no working C compiler ({shlex.join(cc)} --version failed)")
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(cc + flags).encode(),
                                         _cpu_signature().encode(), torch.__version__.encode()])).hexdigest()[:16]
        name = f"sddmm-{key}.so"
        for folder in _cache_dirs():
            if (folder / name).exists() and _trusted(folder):
                return folder / name
        target = _writable_dir() / name
        # Build beside the target, then rename: processes building at once never see half a file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            run = subprocess.run([*cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                 timeout=BUILD_TIMEOUT_S)
            if run.returncode == 0:
                os.replace(tmp, target)
                return target
            errors.append(f"{shlex.join([*cc, *flags])}: {run.stderr.strip()[-2000:]}")
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{shlex.join([*cc, *flags])}: {exc}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeBuildError("building the CPU SDDMM kernel failed:\n" + "\n".join(errors))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.sparseft_native_abi() != ABI:
        raise NativeBuildError(f"{path}: kernel ABI {lib.sparseft_native_abi()}, expected {ABI}")
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sparseft_block_tokens.restype = i64
    lib.sparseft_sddmm_f32.restype = None
    lib.sparseft_sddmm_f32.argtypes = [i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, ptr, ctypes.c_int]
    lib.sparseft_tile_sddmm_f32.restype = None
    lib.sparseft_tile_sddmm_f32.argtypes = [i64, ptr, i64, ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on the first call; None when it is off or unavailable."""
    setting = _setting()
    if setting == "off":
        return None
    with _LOCK:
        if "lib" not in _state:
            try:
                _state["lib"] = _load(_build(compiler()))
            except (NativeBuildError, OSError, AttributeError) as exc:
                _state["lib"] = None
                _state["error"] = str(exc)
                if setting != "require":
                    warnings.warn(f"sparseft: the compiled CPU SDDMM is unavailable, using torch's "
                                  f"(slower): {exc}", RuntimeWarning, stacklevel=2)
        lib = _state["lib"]
    if lib is None and setting == "require":
        raise NativeBuildError(f"SPARSEFT_NATIVE=1 but the kernel is unavailable: {_state.get('error')}")
    return lib  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def reset() -> None:
    """Forget the loaded kernel (tests; a changed SPARSEFT_NATIVE or compiler)."""
    with _LOCK:
        _state.clear()


def supports(row_factor: torch.Tensor, col_factor: torch.Tensor) -> bool:
    """Whether the kernel can take these factors: CPU fp32 (other CPU float dtypes upcast)."""
    return (row_factor.device.type == "cpu" and col_factor.device.type == "cpu"
            and row_factor.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and col_factor.dtype == row_factor.dtype)


def _token_major(a: torch.Tensor) -> torch.Tensor:
    a = a if a.dtype == torch.float32 else a.float()
    return a if a.stride(1) == 1 and a.stride(0) >= a.shape[1] else a.contiguous()


def _fresh_buffer(slot: str, numel: int) -> torch.Tensor:
    return torch.empty(numel, dtype=torch.float32)


def sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
          weight_shape: tuple[int, int], lib: ctypes.CDLL,
          buffer: Callable[[str, int], torch.Tensor] = _fresh_buffer) -> torch.Tensor:
    """out[e] = sum_t row_factor[t, row(e)] * col_factor[t, col[e]] over the CSR pattern
    (int32 ``crow``/``col``), in fp32. ``buffer(slot, numel)`` gives the kernel's working
    memory (contiguous CPU fp32, at least ``numel``): fresh by default, the caller's reused
    per-thread buffers in ``delta.sddmm``."""
    rows, cols = weight_shape
    tokens = row_factor.shape[0]
    # The kernel trusts its arguments: check what would make it read out of bounds.
    if crow.dtype != torch.int32 or col.dtype != torch.int32 or crow.numel() != rows + 1:
        raise ValueError(f"CSR pattern must be int32 with rows + 1 = {rows + 1} row pointers")
    if row_factor.shape[1] != rows or col_factor.shape != (tokens, cols):
        raise ValueError(f"factors {tuple(row_factor.shape)} and {tuple(col_factor.shape)} do not fit a "
                         f"{rows} x {cols} weight")
    g, x = _token_major(row_factor), _token_major(col_factor)
    crow, col = crow.contiguous(), col.contiguous()
    entries = col.numel()
    threads = max(1, torch.get_num_threads())
    out = torch.empty(entries, dtype=torch.float32)
    partials = buffer("native-partials", (threads - 1) * entries)
    scratch = buffer("native-blocks", threads * int(lib.sparseft_block_tokens()) * (rows + cols))
    lib.sparseft_sddmm_f32(tokens, rows, cols, g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0),
                           crow.data_ptr(), col.data_ptr(), entries, out.data_ptr(), partials.data_ptr(),
                           scratch.data_ptr(), threads)
    return out


def tile_sddmm(row_factor: torch.Tensor, col_factor: torch.Tensor, tile_rows: torch.Tensor, tile_cols: torch.Tensor,
               t: int, lib: ctypes.CDLL) -> torch.Tensor:
    """out[b, i, j] = sum_s row_factor[s, t*tile_rows[b] + i] * col_factor[s, t*tile_cols[b] + j]
    (fp32, tiles x t x t) for t = 16 or 32; int64 tile coordinates."""
    if t not in (16, 32):
        raise ValueError(f"tile side must be 16 or 32, got {t}")
    tokens = row_factor.shape[0]
    if col_factor.shape[0] != tokens or tile_rows.shape != tile_cols.shape or tile_rows.dtype != torch.int64 \
            or tile_cols.dtype != torch.int64:
        raise ValueError("factors must share the token count and tile coordinates be int64 of one length")
    n = tile_rows.numel()
    if n and (int(tile_rows.min()) < 0 or int(tile_cols.min()) < 0
              or (int(tile_rows.max()) + 1) * t > row_factor.shape[1]
              or (int(tile_cols.max()) + 1) * t > col_factor.shape[1]):
        raise ValueError("a tile lies outside the factors")
    g, x = _token_major(row_factor), _token_major(col_factor)
    rows_idx, cols_idx = tile_rows.contiguous(), tile_cols.contiguous()
    out = torch.empty(n, t, t, dtype=torch.float32)
    lib.sparseft_tile_sddmm_f32(tokens, g.data_ptr(), g.stride(0), x.data_ptr(), x.stride(0), n,
                                rows_idx.data_ptr(), cols_idx.data_ptr(), t, out.data_ptr(),
                                max(1, torch.get_num_threads()))
    return out
