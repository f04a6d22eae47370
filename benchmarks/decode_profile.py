"""Where a batch-1 decode step's time goes: matrix products vs everything else, per precision.

    python benchmarks/decode_profile.py                 # random GPT-2-124M, float32 / bfloat16 / int8
    python benchmarks/decode_profile.py --top 15        # also the 15 costliest other ops (torch.profiler)
    python benchmarks/decode_profile.py --precisions "" --int8-kernels 10  # int8: our one-row kernel vs fbgemm's,
                                                                          # the matrices alone and 10 step pairs

Each precision decodes --steps greedy tokens after a 32-token prompt, best of --repeats runs. Then the split, two
ways. Sampled (when py-spy is installed, `pip install py-spy`): `py-spy record --native` attaches for --seconds to a
child process that decodes the same steps once its model is built, and the share of the main thread's samples (the
steps' only, not the prompt's) inside the matrix kernels, inside attention and elsewhere, times the step, gives each
part's milliseconds in the step as it runs. Alone: every weight-matrix kernel a step calls (the Linears' packed
kernels, the fused q/k/v included, and the LM head) once each on one row, back to back, best of 20; they run faster
so than between the other ops. (Earlier splits stubbed the matrices out inside the step; a block's step now runs as
one kernels.cpp call, DecoderLayer, where they cannot be.) No profiler runs during the step timings: its per-op cost
(~5 us an op) would inflate "everything else". --top then profiles the unchanged step once and lists the costliest
ops outside the matrix products. --int8-kernels N times the int8 model's matrix calls alone with each kernel at 1,
2, 8 and 32 rows, then builds the int8 model twice, with model/kernels.cpp for one-row products and with fbgemm's
kernel throughout, and times them in alternation N times in this one process, so that the VM's drift over minutes
falls on both alike.
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# DecoderLayer::step's self time is the matrix products and attention it calls directly (no dispatcher between)
MATMUL_OPS = ("DecoderLayer::step",
              "aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise",
              "quantized::linear_dynamic", "quantized::linear_dynamic_fp16", "aten::_weight_int8pack_mm",
              "tinyformer::int8_linear", "tinyformer::panel_linear")


def build(precision: str, seed: int):
    from tinyformer import GPT, preset
    from tinyformer.model import quant

    torch.manual_seed(seed)
    model = GPT(preset("gpt2", vocab_size=50257)).eval()
    options = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}[precision]
    return quant.pack(quant.set_precision(model, **options))


def step_ms(model, prompt, steps: int, repeats: int) -> float:
    from tinyformer.generation import TokenStream

    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        for _ in TokenStream(model, [prompt], max_new_tokens=steps):
            pass
        best = min(best, time.perf_counter() - start)
    return 1e3 * best / steps


def matrix_ms(model, repeats: int = 20) -> float:
    """The matrix products of one batch-1 step alone: each weight-matrix kernel once on one row, back to back."""
    from tinyformer.model.layers import Linear
    from tinyformer.model.quant import FusedLinears

    calls = [(m._kernel, m.in_features) for m in model.modules() if isinstance(m, Linear) and m._kernel is not None]
    calls += [(v.kernel, v.layers[0].in_features) for m in model.modules() for v in vars(m).values()
              if isinstance(v, FusedLinears) and v.kernel is not None]
    inputs = [(kernel, torch.randn(1, features)) for kernel, features in calls]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for kernel, x in inputs:
            kernel(x)
        best = min(best, time.perf_counter() - start)
    return 1e3 * best


# what a sample's native stack passes through: our matrix kernels, oneDNN's, fbgemm's, MKL's (the float32 LM head's
# torch.bmm); our attention kernels
MATRIX_FRAMES = ("int8_linear", "panel_linear", "mkldnn", "dnnl", "fbgemm", "bmm", "gemm")
ATTENTION_FRAMES = ("attend", "decode_attention")


def sampled_split(precision: str, seed: int, seconds: float) -> dict | None:
    """{"matrix": share, "attention": share, "else": share} of the main thread's samples during decode steps, by
    py-spy (--native: C++ frames too) attached to a child process once its model is built, or None without py-spy.
    py-spy pauses the process for each native sample, so the child decodes slower while sampled; the shares are of
    its own time, which the pauses do not enter."""
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        return None
    child = subprocess.Popen([sys.executable, __file__, "--sample-worker", precision, "--seed", str(seed)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        child.stdout.readline()  # "ready": built and warmed up
        with tempfile.TemporaryDirectory() as directory:
            raw = Path(directory) / "samples.txt"
            subprocess.run([py_spy, "record", "--native", "--rate", "100", "--duration", str(int(seconds)),
                            "--format", "raw", "--output", str(raw), "--pid", str(child.pid)],
                           check=True, capture_output=True)
            lines = raw.read_text().splitlines()
    finally:
        child.kill()
        child.wait()
    counts = collections.Counter()
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if "sample_worker" not in stack or "prefill" in stack:  # only the steps, not the prompt's pass
            continue
        part = ("matrix" if any(f in stack for f in MATRIX_FRAMES)
                else "attention" if any(f in stack for f in ATTENTION_FRAMES) else "else")
        counts[part] += int(n)
    total = sum(counts.values())
    return {part: counts[part] / total for part in ("matrix", "attention", "else")} if total else None


def sample_worker(precision: str, seed: int) -> None:
    """Build the model, say "ready", then decode batch-1 steps until killed (sampled_split's child)."""
    from tinyformer.generation import TokenStream

    model = build(precision, seed)
    prompt = torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(seed)).tolist()
    for _ in TokenStream(model, [prompt], max_new_tokens=8):  # warm up
        pass
    print("ready", flush=True)
    while True:
        for _ in TokenStream(model, [prompt], max_new_tokens=128):
            pass


def profile_steps(model, prompt, steps: int):
    from tinyformer.generation import TokenStream

    for _ in TokenStream(model, [prompt], max_new_tokens=steps):  # warm up
        pass
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in TokenStream(model, [prompt], max_new_tokens=steps):
            pass
        wall = time.perf_counter() - start
    events = prof.key_averages()
    # top-level matrix ops only: aten::linear contains addmm, so count each op's self time plus its kernels'
    matmul_us = sum(e.self_cpu_time_total for e in events if any(e.key == op for op in MATMUL_OPS))
    others = sorted((e for e in events if e.key not in MATMUL_OPS), key=lambda e: -e.self_cpu_time_total)
    return wall, matmul_us / 1e6, others


def compare_int8_kernels(prompt, steps: int, pairs: int, seed: int) -> None:
    import statistics

    from tinyformer.model import kernels

    if kernels.library() is None:
        print("int8 kernels: ours is not built here (see tinyformer/model/kernels.py); nothing to compare")
        return
    ours = build("int8", seed)
    kernels._library = None  # the next build falls back to fbgemm for every batch size
    try:
        fbgemm = build("int8", seed)
    finally:
        kernels._library = None
        kernels._tried = False
    times = [(step_ms(ours, prompt, steps, 1), step_ms(fbgemm, prompt, steps, 1)) for _ in range(pairs)]
    speedups = sorted(b / a for a, b in times)
    print(f"\nint8 step ms, ours (one row) / fbgemm, {pairs} alternating pairs: "
          + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in times))
    ours_ms, fbgemm_ms = statistics.median(a for a, _ in times), statistics.median(b for _, b in times)
    print(f"median ours {ours_ms:.2f} ms, fbgemm {fbgemm_ms:.2f} ms; speedup per pair: "
          f"median {statistics.median(speedups):.3f}x, min {speedups[0]:.3f}x, "
          f"max {speedups[-1]:.3f}x")


def time_int8_matrices(seed: int, rows=(1, 2, 8, 32), repeats: int = 6) -> None:
    """The int8 model's matrix products alone, back to back (one token's worth of calls): ours vs fbgemm's."""
    from tinyformer.model.quant import FusedLinears, Int8Kernel

    model = build("int8", seed)
    found = [m._kernel for m in model.modules() if isinstance(getattr(m, "_kernel", None), Int8Kernel)]
    found += [v.kernel for m in model.modules() for v in vars(m).values()
              if isinstance(v, FusedLinears) and isinstance(v.kernel, Int8Kernel)]
    if not found or found[0].one_row is None or found[0].packed is None:
        print("int8 matrices: needs both our kernel and fbgemm")
        return
    megabytes = sum(k._groups().numel() for k in found) / 1e6
    print(f"\nint8: the model's {len(found)} matrix calls ({megabytes:.0f} MB) back to back, best of {repeats}, ms")
    print("| rows | ours | fbgemm |\n|---:|---:|---:|")
    for m in rows:
        xs = [torch.randn(m, k._groups().shape[1]) for k in found]
        runs = {"ours": lambda: [k.one_row(x, k._groups(), k.scale, k.bias) for k, x in zip(found, xs)],
                "fbgemm": lambda: [torch.ops.quantized.linear_dynamic(x, k.packed, True) for k, x in zip(found, xs)]}
        best = {name: float("inf") for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"| {m} | {best['ours'] * 1e3:.2f} | {best['fbgemm'] * 1e3:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=int, default=30, help="of sampling per precision (py-spy)")
    parser.add_argument("--sample-worker", help=argparse.SUPPRESS)  # internal: sampled_split's child
    parser.add_argument("--int8-kernels", type=int, default=0, metavar="N",
                        help="then time int8 with our one-row kernel vs fbgemm's, N alternating pairs")
    args = parser.parse_args(argv)
    if args.sample_worker:
        sample_worker(args.sample_worker, args.seed)
        return 0
    prompt = torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.steps} steps "
          f"(a run's time over its steps; its prefill is one call of {args.steps + 1}), best of {args.repeats} runs")
    print("| precision | step ms | matrix products, sampled in the step | attention, sampled | everything else, "
          "sampled | matrix products alone | step minus them |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    details = []
    for precision in filter(None, args.precisions.split(",")):
        model = build(precision, args.seed)
        whole = step_ms(model, prompt, args.steps, args.repeats)
        if args.top:
            details.append((precision, profile_steps(model, prompt, args.steps)[2]))
        matrices = matrix_ms(model)
        del model
        shares = sampled_split(precision, args.seed, args.seconds)
        sampled = [f"{whole * shares[part]:.2f}" for part in ("matrix", "attention", "else")] if shares else ["-"] * 3
        print(f"| {precision} | {whole:.2f} | {' | '.join(sampled)} | {matrices:.2f} | {whole - matrices:.2f} |",
              flush=True)
    if args.int8_kernels:
        time_int8_matrices(args.seed)
        compare_int8_kernels(prompt, args.steps, args.int8_kernels, args.seed)
    for precision, others in details:
        print(f"\n{precision}: costliest other ops (self CPU ms per step, calls per step, under the profiler)")
        for e in others[:args.top]:
            print(f"  {e.key:<44} {e.self_cpu_time_total / 1e3 / args.steps:7.3f}  {e.count / args.steps:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
