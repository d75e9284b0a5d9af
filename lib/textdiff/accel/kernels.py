"""CPU kernels (``csrc/cpu_kernels.c``): GroupNorm + GELU in one kernel for the head's training and GroupNorm + SiLU
for the backbone's inference (bf16 or fp32), and the backbone's self-attention in bf16 (head size 32 or 64).

GELU's erf makes it ~5x as slow as a plain elementwise pass on this project's CPUs, and PyTorch runs the pair as two
ops forward and two backward (GroupNorm's channels-last backward as several more passes, see head.py); the head has
9 such pairs, 4 of them on 16-channel maps at full resolution. The C kernel does the pair in 2 passes each way with a
cheap polynomial erf. It is compiled on first use with the machine's C compiler (``CC``, else ``cc``/``gcc``; about a
second) into a cache folder, keyed by source, flags, compiler and CPU, and loaded with ctypes. Anything that fails
(no compiler, another OS or CPU family, ``TEXTDIFF_NATIVE=0``) leaves the PyTorch ops in place: same function, slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from filelock import FileLock

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
# -march=native: the cache key holds the CPU, so a cache folder shared between machines builds once per CPU kind.
# OpenMP resolves to the libgomp.so.1 PyTorch has already loaded (same soname): one thread pool for both.
# -fno-trapping-math lets GCC vectorise the kernel's selects; not -ffast-math, whose start-up code would switch the
# whole process's floating-point mode (flush-to-zero).
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "TEXTDIFF_NATIVE"  # "0": never build or use the kernel


def cache_dir() -> Path:
    root = os.environ.get("TEXTDIFF_NATIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "textdiff", "native")
    return Path(root)


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(keep))  # one copy per distinct line, not one per core


def _compiler() -> list[str] | None:
    """The compiler command: ``CC`` (which may carry flags, as in make), else cc or gcc on the PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _check_private(path: Path) -> Path:
    """``path`` if this user owns it and nobody else may write it: a shared library loaded from a place others can
    write runs their code in this process."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{path} is not private to this user (owner uid {info.st_uid}, "
                           f"mode {oct(info.st_mode & 0o777)}): the kernel is neither built nor loaded there; "
                           "set TEXTDIFF_NATIVE_CACHE to a folder of yours")
    return path


def build(out_dir: Path | None = None) -> Path:
    """Compile the kernel (or find it compiled) in ``out_dir`` (default: the user's cache folder, never a shared
    temp folder) and return the shared library's path; raises on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(compiler + list(FLAGS)), version,
                                    _cpu_signature()]).encode())
    name = f"cpu_kernels-{key.hexdigest()[:16]}.so"
    folder = Path(out_dir) if out_dir else cache_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder)
    path = folder / name
    # one build at a time per library (processes started together, e.g. torchrun's): the others wait, then find it
    with FileLock(str(folder / f"{name}.lock"), timeout=600):
        if path.is_file():
            return _check_private(path)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed into place
            target = Path(tmp) / name
            result = subprocess.run([*compiler, *FLAGS, str(SOURCE), "-o", str(target), "-lm"], capture_output=True,
                                    text=True, timeout=300)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(compiler)} failed: {result.stderr.strip()[-2000:]}")
            os.chmod(target, 0o700)
            os.replace(target, path)
    return path


def platform_supported() -> bool:
    """Built and measured on x86-64 Linux with PyTorch's OpenMP; elsewhere the PyTorch ops are the safe choice."""
    return (platform.system() == "Linux" and platform.machine() == "x86_64"
            and "OpenMP" in torch.__config__.parallel_info())


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel, or None where it cannot be used here (see the module's docstring)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if not platform_supported():
        return None
    try:
        path = build()
        # another OpenMP runtime (e.g. clang's libomp) would run its own thread pool beside PyTorch's, and the two
        # pools' waiting threads spin against each other: slower than PyTorch's own ops
        if b"libgomp.so.1" not in path.read_bytes():
            raise RuntimeError(f"{path.name} is not linked to GNU OpenMP (libgomp.so.1), which PyTorch uses")
        lib = ctypes.CDLL(str(path))
    except Exception as error:  # the PyTorch ops still work
        warnings.warn(f"fused GroupNorm+GELU kernel unavailable ({error}); training uses the slower PyTorch ops")
        return None
    p, n, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.textdiff_gn_moments.argtypes = [i, i, p, n, n, n, p]
    lib.textdiff_gn_gelu_forward.argtypes = [i, i, p, p, p, n, n, n, p]
    lib.textdiff_gn_gelu_backward_sums.argtypes = [i, i, p, p, p, p, n, n, n, p, p]
    lib.textdiff_gn_input_grad.argtypes = [i, i, p, p, p, p, p, n, n, n, p]
    lib.textdiff_gn_silu_forward.argtypes = [i, i, p, p, p, n, n, n, p]
    lib.textdiff_attention.argtypes = [i, p, p, p, n, n, n, n, n, ctypes.c_float, p]
    lib.textdiff_attention.restype = i
    lib.textdiff_attention_supported.argtypes = []
    lib.textdiff_attention_supported.restype = i
    for function in (lib.textdiff_gn_gelu_forward, lib.textdiff_gn_input_grad, lib.textdiff_gn_silu_forward):
        function.restype = None
    lib.textdiff_gn_moments.restype = i  # 0, or -1: a thread's scratch could not be allocated
    lib.textdiff_gn_gelu_backward_sums.restype = i
    return lib


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the CPU kernel could not allocate its per-thread scratch memory")


def _kernel_map(x: torch.Tensor) -> bool:
    """A map the GroupNorm kernels take: bf16 or fp32, on the CPU, channels-last (and not also plain), kernel built."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 4 and x.numel() > 0
            and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) and library() is not None)


def applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``group_norm_gelu`` runs the kernel for this input: a kernel map (above) in training."""
    return weight is not None and torch.is_grad_enabled() and _kernel_map(x)


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float):
    """GroupNorm folded into a per-sample, per-channel affine map y = x * scale + shift ((N, C) fp32 each, from the
    kernel's double sums), with the per-channel mean and 1/std the backward needs."""
    n, c, h, w = x.shape
    pixels, per_group = h * w, c // groups
    moments = torch.empty(n, 2, c, dtype=torch.float64)
    _check(library().textdiff_gn_moments(torch.get_num_threads(), int(x.dtype == torch.float32), x.data_ptr(), n,
                                         pixels, c, moments.data_ptr()))
    moments = moments.view(n, 2, groups, per_group).sum(3) / (per_group * pixels)
    mean = moments[:, 0]
    rstd = ((moments[:, 1] - mean * mean).clamp(min=0) + eps).rsqrt()
    mean_c = mean.float().repeat_interleave(per_group, 1)  # (N, C)
    rstd_c = rstd.float().repeat_interleave(per_group, 1)
    scale = (weight.float() * rstd_c).contiguous()
    shift = (bias.float() - mean_c * scale).contiguous()
    return scale, shift, mean_c, rstd_c


class _GroupNormGELU(torch.autograd.Function):
    """gelu(group_norm(x)) with fp32 math inside (double sums); bf16 or fp32 in and out, as PyTorch's ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        scale, shift, mean_c, rstd_c = _affine(x, weight, bias, groups, eps)
        out = torch.empty_like(x)  # channels-last, as x
        n, c, h, w = x.shape
        library().textdiff_gn_gelu_forward(torch.get_num_threads(), int(x.dtype == torch.float32), x.data_ptr(),
                                           scale.data_ptr(), shift.data_ptr(), n, h * w, c, out.data_ptr())
        ctx.save_for_backward(x, weight, scale, shift, mean_c, rstd_c)
        ctx.groups = groups
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative would be PyTorch's ops' job: say so
    def backward(ctx, grad):
        lib = library()
        x, weight, scale, shift, mean_c, rstd_c = ctx.saved_tensors
        n, c, h, w = x.shape
        groups, pixels = ctx.groups, h * w
        per_group = c // groups
        grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
        dy = torch.empty_like(x)  # the gradient at GroupNorm's output, in x's type (as PyTorch's GELU backward)
        sums = torch.empty(n, 2, c, dtype=torch.float64)
        threads, fp32 = torch.get_num_threads(), int(x.dtype == torch.float32)
        _check(lib.textdiff_gn_gelu_backward_sums(threads, fp32, x.data_ptr(), grad.data_ptr(), scale.data_ptr(),
                                                  shift.data_ptr(), n, pixels, c, dy.data_ptr(), sums.data_ptr()))
        sum_dy_x, sum_dy = sums.float().unbind(1)  # (N, C) each
        a, b, k, dweight, dbias = group_norm_backward_terms(
            sum_dy_x, sum_dy, weight, mean_c[:, ::per_group], rstd_c[:, ::per_group], pixels)
        dx = torch.empty_like(x)
        lib.textdiff_gn_input_grad(threads, fp32, x.data_ptr(), dy.data_ptr(), a.data_ptr(), b.data_ptr(), k.data_ptr(),
                                   n, pixels, c, dx.data_ptr())
        return dx, dweight, dbias, None, None


def group_norm_backward_terms(sum_dy_x: torch.Tensor, sum_dy: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                              rstd: torch.Tensor, pixels: int):
    """GroupNorm's backward from the per-sample, per-channel sums of dy * x and dy ((N, C), fp32) and the forward's
    per-group statistics ((N, G)): dx = a * dy + b * x + k with a, b, k (N, C) fp32 (contiguous), and the weight's
    and bias's gradients. Shared by the kernel and head.py's PyTorch-op backward."""
    n, c = sum_dy_x.shape
    groups = mean.shape[1]
    per_group, count = c // groups, c // groups * pixels
    gamma, mean, rstd = weight.float(), mean.float(), rstd.float()

    def per_channel(t):  # (N, G) -> (N, C)
        return t.repeat_interleave(per_group, 1).contiguous()

    ds = (sum_dy_x * gamma).view(n, groups, per_group).sum(2)
    db = (sum_dy * gamma).view(n, groups, per_group).sum(2)
    b = (db * mean - ds) * rstd ** 3 / count
    k = -b * mean - db * rstd / count
    a = (per_channel(rstd) * gamma).contiguous()
    dweight = ((sum_dy_x - sum_dy * per_channel(mean)) * per_channel(rstd)).sum(0).to(weight.dtype)
    return a, per_channel(b), per_channel(k), dweight, sum_dy.sum(0).to(weight.dtype)


def group_norm_gelu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """The kernel's GroupNorm + GELU; callers check ``applies`` first."""
    with torch.autocast("cpu", enabled=False):
        return _GroupNormGELU.apply(x, weight, bias, groups, eps)


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """silu(norm(x)) without gradients (the frozen backbone's ResNet blocks): the kernel for a bf16 or fp32
    channels-last CPU map, in the map's type (PyTorch's ops round GroupNorm's output to it, then SiLU's again), else
    PyTorch's ops."""
    if torch.is_grad_enabled() or not norm.affine or not _kernel_map(x):
        return torch.nn.functional.silu(norm(x))
    scale, shift, _, _ = _affine(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    out = torch.empty_like(x)
    n, c, h, w = x.shape
    library().textdiff_gn_silu_forward(torch.get_num_threads(), int(x.dtype == torch.float32), x.data_ptr(),
                                       scale.data_ptr(), shift.data_ptr(), n, h * w, c, out.data_ptr())
    return out


def attention_supported(head_dim: int) -> bool:
    """Whether ``attention`` runs the kernel for bf16 CPU maps of this head size here (AVX-512 BF16, d 32 or 64)."""
    return head_dim in (32, 64) and library() is not None and bool(library().textdiff_attention_supported())


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor | None:
    """softmax(q k^T / sqrt(d)) v per head, without gradients, for the projections' outputs as they come: query
    (B, L, heads * d), key and value (B, S, heads * d), bf16 CPU tensors, d = 32 or 64; the result is laid out as
    the query. None where the kernel does not apply (the caller runs SDPA): other types, devices or head sizes, a CPU
    without AVX-512 BF16, or no kernel at all. Within bf16 rounding of PyTorch's CPU flash kernel; ~2x its speed."""
    if (torch.is_grad_enabled() or query.device.type != "cpu" or query.dim() != 3
            or any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in (query, key, value))
            or query.shape[-1] % heads or query.shape[-1] // heads not in (32, 64) or key.shape != value.shape
            or key.shape[0] != query.shape[0] or key.shape[-1] != query.shape[-1] or 0 in query.shape + key.shape):
        return None
    if not attention_supported(query.shape[-1] // heads):
        return None
    batch, length, width = query.shape
    head_dim = width // heads
    out = torch.empty_like(query)
    status = library().textdiff_attention(torch.get_num_threads(), query.data_ptr(), key.data_ptr(), value.data_ptr(),
                                          batch, heads, length, key.shape[1], head_dim, head_dim ** -0.5,
                                          out.data_ptr())
    return out if status == 0 else None  # out of memory in the kernel: SDPA instead
