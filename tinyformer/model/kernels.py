"""tinyformer's own CPU kernels for inference (kernels.cpp), compiled on first use: int8 weights at one row,
float32 and 16-bit weights at any number of rows (quant.Int8Kernel and FloatKernel say when each runs), the
attention of a decode step (layers.Attention), a decoder's whole decode step in one call (DecoderLayer per block,
DecoderStack for all: layers.DecodeStack), greedy's argmax and beam search's top-k.

Why our own: in a decode step of one or a few rows each weight matrix is read once from memory, so the kernel's read
bandwidth sets the speed. fbgemm's int8 kernel (what torch offers) streams GPT-2-124M's 49 int8 matrices (124 MB)
at 12-20 GB/s with two threads on the AVX2 machine the benchmarks run on, where a plain sum reads memory at ~27 GB/s;
kernels.cpp took 5.4 vs 6.1 ms and 7.7 vs 10.1 ms in two runs, and 6.9 vs 9.2 with its software prefetch, and the
whole decode step runs 1.13-1.20x faster (medians of 10 alternating pairs in one process, three runs; the last with
the prefetch). In benchmarks/decode.py's run with it, int8 batch 1 went from 0.63-0.65x llama.cpp q8_0 to 0.89x.
`python benchmarks/decode_profile.py --precisions "" --int8-kernels 10` measures both. In float32, MKL's and
oneDNN's matrix-vector products read small matrices slowly (an opus-mt-sized decoder's 512-wide ones at ~14-16
GB/s); our first kernel (float_linear, row-by-row dot products) read them at ~19-21 and made a beam-4 translation
1.31x faster; its successor panel_linear, an outer product on weights repacked in panels of 8 output features,
reads them at ~30 and from a few rows on runs near the FMA units' peak, 1.2-1.5x oneDNN's pre-packed product at
9-1024 rows; on 16-bit weights it beats fbgemm's float16 kernel from 1 to 32 rows. SDPA's CPU kernel spreads a decode step's few
(row, head) pairs over the threads and waits for them; decode_attention runs them on one thread when they are few
(below 2^15 query-key products) and reads the KV cache in place, through beam search's row table (GPT-2 batch 8
1.16x, a batch-32 beam-4 translation 1.10x). The matrix kernels add the residual stream as they store their
output.

On CPUs with AVX-512 the float kernel reads panels of 16 output features (16 lanes an FMA, 32 registers), and with
AVX-512 VNNI the int8 kernel sums 4 products a lane in one instruction and takes up to 16 rows (a batch of 16 then
takes the one-call block step); both give the same bits as the AVX2 versions and prefetch their weight streams in
software. On a 2-core AVX-512 VM, GPT-2-124M at batch 8: int8 ~690 -> ~850 tok/s, bfloat16 1.16x, float32 1.20x.
On CPUs with AMX (Sapphire Rapids and later) bfloat16 weights go through the tile unit (amx_bfloat16), each float32
activation row carried as two bfloat16 rows (hi + lo: 16 significant bits, so the arithmetic stays within ~3e-6 of
float32's); GPT-2-124M's 49 matrices at 1 / 8 rows 4.57 / 5.08 ms against AVX-512's 4.90 / 6.92, its bfloat16
decode at batch 8 1.20x faster (6 of 6 alternating pairs). The attention kernels read float32 or 16-bit KV caches
(16-bit weights keep 16-bit keys and values: quant.cache_dtype), widening them exactly.

The build needs a C++ compiler (g++ or clang) and ninja (a dependency), and an x86-64 CPU with AVX2 and FMA (every
such CPU also has F16C, which the float16 loads use); it
takes ~20 s and is cached under ~/.cache/tinyformer (XDG_CACHE_HOME). Without them, or with TINYFORMER_KERNELS=0,
`library()` returns None and torch's kernels (fbgemm, oneDNN) run for every batch size.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]  # -fopenmp: at::parallel_for runs on torch's OpenMP pool

_library = None
_tried = False


def supported() -> bool:
    """An x86-64 CPU with AVX2 (torch's own check, which includes FMA), and not switched off."""
    if os.environ.get("TINYFORMER_KERNELS", "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def build_directory() -> Path:
    """One directory per source, flags, torch and Python version, so a stale build is never loaded."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + torch.__version__.encode()
                         + sys.version.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tinyformer" / f"kernels-{key}"


def ninja_on_path() -> str:
    """PATH with the ninja package's directory first: torch runs `ninja` from PATH, which lacks the venv's bin
    unless the venv is activated."""
    path = os.environ.get("PATH", "")
    try:
        import ninja
    except ImportError:  # a system ninja may still be there
        return path
    return ninja.BIN_DIR + os.pathsep + path


def library():
    """The loaded kernel (torch.ops.tinyformer), built the first time; None where it cannot run."""
    global _library, _tried
    if _tried:
        return _library
    _tried = True
    if not supported():
        return None
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        lock = directory / "lock"  # torch waits forever on the lock of a build that was killed
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
        if not (directory / "tinyformer_kernels.so").exists():
            print("tinyformer: compiling its CPU kernels (once, ~20 s)", file=sys.stderr, flush=True)
        os.environ["PATH"] = ninja_on_path()
        load("tinyformer_kernels", [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
             build_directory=str(directory), is_python_module=False, verbose=False)
        _library = torch.ops.tinyformer
    except Exception as error:  # no compiler, no ninja, a read-only home: fbgemm's kernel still works
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"tinyformer: matrix products use torch's kernels (slower); building ours failed: {reason}",
              file=sys.stderr)
        _library = None
    finally:
        os.environ["PATH"] = path
    return _library


def panel_width() -> int:
    """Output features per weight panel for panel_linear on this CPU: 16 (AVX-512 vectors) where torch's own
    capability check finds AVX-512 (F, BW, VL, DQ; ATEN_CPU_CAPABILITY=avx2 lowers it) and kernels.cpp agrees, else
    8 (AVX2). TINYFORMER_KERNELS=avx2 keeps 8 on an AVX-512 CPU, to compare the two."""
    ops = library()
    if (ops is None or os.environ.get("TINYFORMER_KERNELS") == "avx2"
            or torch.backends.cpu.get_cpu_capability() != "AVX512"):
        return 8
    return max(ops.panel_widths())


def int8_vnni() -> bool:
    """Whether int8_linear runs its AVX-512 VNNI kernel on this CPU (the same bits as its AVX2 one, faster from one
    row and fast enough at a few rows to replace fbgemm there: quant.Int8Kernel), under the same conditions as
    panel_width's 16."""
    ops = library()
    return (ops is not None and os.environ.get("TINYFORMER_KERNELS") != "avx2"
            and torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(ops.has_vnni()))


AMX_LAYOUT = 32  # panel_linear's `width` for bfloat16 weights in quant.amx_panels' layout (amx::kLayout)


def amx_bfloat16() -> bool:
    """Whether bfloat16 weights go through kernels.cpp's AMX kernel on this CPU (panel_linear width AMX_LAYOUT, in
    quant.amx_panels' layout): with AMX-BF16 and AVX-512 BF16, where Linux lets the process use the tiles, under
    panel_width's 16 conditions. TINYFORMER_KERNELS=avx512 keeps the AVX-512 kernel, to compare the two."""
    ops = library()
    return (ops is not None and os.environ.get("TINYFORMER_KERNELS") not in ("avx2", "avx512")
            and torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(ops.has_amx()))


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1), the same answer (the first index on ties, the first NaN if any), through kernels.cpp's
    argmax_rows for contiguous float32 CPU tensors: torch's reduction reads GPT-2's 50257 logits at ~2 ns a value
    here, 0.1 ms of a ~7 ms int8 decode step."""
    ops = library()
    if ops is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.is_contiguous() and x.dim():
        return ops.argmax_rows.default(x)
    return x.argmax(-1)


MOST_TOP = 64  # the largest k kernels.cpp's topk_rows takes


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k, dim=-1) of a 2-D tensor, largest first, through kernels.cpp's topk_rows for contiguous float32 CPU
    tensors (equal values in index order; torch.topk leaves their order open): one pass a row instead of torch's
    selection, ~0.99 ms -> ~0.08 ms for beam search's 32 x 32768 step at batch 32, beam 4."""
    ops = library()
    if (ops is not None and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.is_contiguous() and 1 <= k <= min(MOST_TOP, x.shape[1])):
        return ops.topk_rows.default(x, k)
    return x.topk(k, dim=-1)


def beam_topk(logits: torch.Tensor, scores: torch.Tensor, group: int, k: int,
              banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search's step: log_softmax of each row of logits [R, V], the banned token ids at -inf, plus each row's
    score [R], then the k best of each source's `group` rows side by side ([R / group, group x V]) -> (values,
    indices) [R / group, k], largest first, equal values in index order. kernels.cpp's beam_topk does it in one pass
    a source for float32 CPU tensors (its exp is a polynomial: log-probabilities equal torch's to rounding); else
    torch's ops (logits are written over)."""
    ops = library()
    R, V = logits.shape
    if (ops is not None and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and scores.dtype == torch.float32 and 1 <= k <= min(MOST_TOP, group * V)):
        return ops.beam_topk.default(logits.contiguous(), scores.contiguous(), group, k, banned)
    logprobs = logits.float()
    logprobs = torch.log_softmax(logprobs, -1, out=logprobs) if logprobs.is_contiguous() else logprobs.log_softmax(-1)
    if banned is not None:
        logprobs.index_fill_(-1, banned, float("-inf"))
    return topk(logprobs.add_(scores.unsqueeze(1)).view(R // group, group * V), k)
