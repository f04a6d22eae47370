"""Where a batch-1 decode step's time goes: matrix products vs everything else (torch.profiler), per precision.

    python benchmarks/decode_profile.py                 # random GPT-2-124M, float32 / bfloat16 / int8
    python benchmarks/decode_profile.py --top 15        # also the 15 costliest other ops

Each precision decodes 64 greedy tokens after a 32-token prompt once to warm up, then 64 more under the profiler.
"matrix products" is the time inside the weight-matrix kernels (F.linear / addmm / mm, oneDNN's pre-packed linear,
fbgemm's quantized and float16 linears); "other" is the rest of the step's wall time: attention, norms, the KV
cache, sampling, Python.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "mkldnn::_linear_pointwise",
              "quantized::linear_dynamic", "quantized::linear_dynamic_fp16", "aten::_weight_int8pack_mm")


def build(precision: str, seed: int):
    from tinyformer import GPT, preset
    from tinyformer.model import quant

    torch.manual_seed(seed)
    model = GPT(preset("gpt2", vocab_size=50257)).eval()
    options = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}[precision]
    return quant.pack(quant.set_precision(model, **options))


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
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--top", type=int, default=0)
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompt = torch.randint(0, 50257, (32,), generator=torch.Generator().manual_seed(args.seed)).tolist()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, {args.steps} steps "
          f"(the prefill is counted in the wall time but is one call of {args.steps + 1})")
    print("| precision | step ms (profiled) | matrix products ms | everything else ms |")
    print("|---|---:|---:|---:|")
    details = []
    for precision in args.precisions.split(","):
        model = build(precision, args.seed)
        wall, matmul, others = profile_steps(model, prompt, args.steps)
        step, mm = 1e3 * wall / args.steps, 1e3 * matmul / args.steps
        print(f"| {precision} | {step:.2f} | {mm:.2f} | {step - mm:.2f} |", flush=True)
        details.append((precision, others))
        del model
    for precision, others in details if args.top else ():
        print(f"\n{precision}: costliest other ops (self CPU ms per step, calls per step)")
        for e in others[:args.top]:
            print(f"  {e.key:<44} {e.self_cpu_time_total / 1e3 / args.steps:7.3f}  {e.count / args.steps:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
