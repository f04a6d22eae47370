"""Where a batch-1 decode step's time goes: matrix products vs everything else, per precision.

    python benchmarks/decode_profile.py                 # random GPT-2-124M, float32 / bfloat16 / int8
    python benchmarks/decode_profile.py --top 15        # also the 15 costliest other ops (torch.profiler)

Each precision decodes --steps greedy tokens after a 32-token prompt, best of --repeats runs, twice: as it is, and
with every weight-matrix kernel (the Linears' packed kernels, fused q/k/v included) replaced by a stub that returns
zeros of the right shape. The second time is "everything else" (attention, norms, residuals, the KV cache,
sampling, Python); the difference is "matrix products". No profiler runs during these timings: its per-op cost
(~5 us an op, ~1,500 ops a step) would inflate "everything else" by several milliseconds. --top then profiles
the unchanged step once and lists the costliest ops outside the matrix products.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise",
              "quantized::linear_dynamic", "quantized::linear_dynamic_fp16", "aten::_weight_int8pack_mm")


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


def stub_matrix_products(model) -> None:
    """Replace every packed weight-matrix kernel by one that only allocates its zero result."""
    from tinyformer.model.layers import Linear
    from tinyformer.model.quant import FusedLinears

    def stub(out_features):
        return lambda x: x.new_zeros(*x.shape[:-1], out_features)

    for module in model.modules():
        if isinstance(module, Linear) and module._kernel is not None:
            module._kernel = stub(module.out_features)
        for value in vars(module).values():
            if isinstance(value, FusedLinears) and value.kernel is not None:
                value.kernel = stub(sum(value.sizes))


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompt = torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.steps} steps "
          f"(a run's time over its steps; its prefill is one call of {args.steps + 1}), best of {args.repeats} runs")
    print("| precision | step ms | matrix products ms | everything else ms |")
    print("|---|---:|---:|---:|")
    details = []
    for precision in args.precisions.split(","):
        model = build(precision, args.seed)
        whole = step_ms(model, prompt, args.steps, args.repeats)
        if args.top:
            details.append((precision, profile_steps(model, prompt, args.steps)[2]))
        stub_matrix_products(model)
        rest = step_ms(model, prompt, args.steps, args.repeats)
        print(f"| {precision} | {whole:.2f} | {whole - rest:.2f} | {rest:.2f} |", flush=True)
        del model
    for precision, others in details:
        print(f"\n{precision}: costliest other ops (self CPU ms per step, calls per step, under the profiler)")
        for e in others[:args.top]:
            print(f"  {e.key:<44} {e.self_cpu_time_total / 1e3 / args.steps:7.3f}  {e.count / args.steps:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
