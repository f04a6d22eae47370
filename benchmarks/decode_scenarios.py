"""Decoding scenarios: tinyformer against Hugging Face transformers on the same random GPT-2-124M weights, one run.

    python benchmarks/decode.py --scenarios            # the table (or python benchmarks/decode_scenarios.py)
    python benchmarks/decode.py --scenarios --json     # machine-readable
    python benchmarks/decode.py --scenarios --quick    # fewer tokens, for a smoke run

Both engines run in float32 on the CPU with the same thread count, greedy unless stated; transformers is told to
ignore <eos> so both generate exactly the asked number of tokens. The weight-bandwidth ceiling is the machine's
measured copy bandwidth (bytes read + written per second) divided by the model's bytes: a batch-1 decoder must read
every weight once per token, so no engine can beat it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

from decode import _timed, copy_bandwidth  # benchmarks/ is on sys.path when either script runs


def build_models(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    import tinyformer

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
    hf = GPT2LMHeadModel(config).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    directory = tempfile.mkdtemp(prefix="tinyformer-bench-")
    hf.save_pretrained(directory)
    ours = tinyformer.load(directory, device="cpu")
    return hf, ours


def hf_generate(hf, prompts: list[list[int]], new: int, **options) -> float:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        return _timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                          min_new_tokens=new, **options))


def ours_generate(lm, prompts: list[list[int]], new: int, **options) -> float:
    return _timed(lambda: lm.generate(prompts, max_new_tokens=new, **options))


def per_step_times(lm, prompt: list[int], new: int) -> list[float]:
    """Wall time of each decode step, from the token stream."""
    from tinyformer.generation import TokenStream

    stamps = [time.perf_counter()]
    for _ in TokenStream(lm.model, [prompt], max_new_tokens=new):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[1:], stamps[2:])]  # drop the prefill step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer tokens (smoke run, noisier)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scale = 4 if args.quick else 1
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads; building GPT-2 124M (random weights)...")
    hf, lm = build_models(args.seed)
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    bandwidth = copy_bandwidth()
    ceiling = bandwidth / model_bytes
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, 50257, (32,), generator=generator).tolist()
    batch8 = torch.randint(0, 50257, (8, 32), generator=generator).tolist()

    # warm both up (first calls allocate and pick kernels)
    hf_generate(hf, [prompt], 4)
    ours_generate(lm, [prompt], 4, temperature=0)

    rows = []

    def scenario(name, tokens, hf_seconds, ours_seconds):
        row = {"scenario": name, "tokens": tokens, "transformers_tok_s": tokens / hf_seconds,
               "tinyformer_tok_s": tokens / ours_seconds}
        row["ratio"] = row["tinyformer_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        log(f"  {name:<34} transformers {row['transformers_tok_s']:7.2f} tok/s   tinyformer "
            f"{row['tinyformer_tok_s']:7.2f} tok/s   x{row['ratio']:.2f}")

    n = 256 // scale
    log("measuring...")
    scenario(f"greedy, batch 1 ({n} new)", n, hf_generate(hf, [prompt], n, do_sample=False),
             ours_generate(lm, [prompt], n, temperature=0))
    scenario(f"greedy, batch 8 ({n} new)", 8 * n, hf_generate(hf, batch8, n, do_sample=False),
             ours_generate(lm, batch8, n, temperature=0))
    scenario(f"sample k50 p0.9 T0.8, batch 1", n,
             hf_generate(hf, [prompt], n, do_sample=True, top_k=50, top_p=0.9, temperature=0.8),
             ours_generate(lm, [prompt], n, temperature=0.8, top_k=50, top_p=0.9, seed=1))
    b = 64 // scale
    scenario(f"beam search, 4 beams ({b} new)", b,
             hf_generate(hf, [prompt], b, do_sample=False, num_beams=4, early_stopping=False),
             ours_generate(lm, [prompt], b, num_beams=4))
    uncached = []
    for length in (64, 128, 256, 512):
        long_prompt = torch.randint(0, 50257, (length,), generator=generator).tolist()
        k = max(2, 8 // scale)
        hf_s = hf_generate(hf, [long_prompt], k, do_sample=False, use_cache=False)
        ours_s = ours_generate(lm, [long_prompt], k, temperature=0, use_cache=False)
        scenario(f"uncached, {length}-token context", k, hf_s, ours_s)
        uncached.append(rows[-1])

    steps = per_step_times(lm, prompt, 512 // scale)
    early = sorted(steps[40 // scale:60 // scale])
    late = sorted(steps[-20 // scale:])
    t_early, t_late = early[len(early) // 2], late[len(late) // 2]
    greedy = rows[0]["tinyformer_tok_s"]
    summary = {
        "model_bytes": model_bytes, "copy_bandwidth_gb_s": bandwidth / 1e9, "ceiling_tok_s": ceiling,
        "tinyformer_weight_bandwidth_gb_s": greedy * model_bytes / 1e9,
        "transformers_weight_bandwidth_gb_s": rows[0]["transformers_tok_s"] * model_bytes / 1e9,
        "greedy_b1_fraction_of_ceiling": greedy / ceiling,
        "step_ms_near_token_50": t_early * 1e3, "step_ms_near_token_500": t_late * 1e3,
        "late_over_early": t_late / t_early, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
        return 0
    print()
    print(f"| scenario | transformers tok/s | tinyformer tok/s | ratio |")
    print(f"|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scenario']} | {r['transformers_tok_s']:.2f} | {r['tinyformer_tok_s']:.2f} | {r['ratio']:.2f}x |")
    print()
    print(f"model {model_bytes / 1e6:.0f} MB; copy bandwidth {bandwidth / 1e9:.1f} GB/s -> ceiling {ceiling:.1f} tok/s")
    print(f"greedy batch 1: tinyformer reads weights at {summary['tinyformer_weight_bandwidth_gb_s']:.1f} GB/s "
          f"({100 * summary['greedy_b1_fraction_of_ceiling']:.0f}% of the ceiling), transformers at "
          f"{summary['transformers_weight_bandwidth_gb_s']:.1f} GB/s")
    print(f"cached step cost: {t_early * 1e3:.1f} ms near token 50, {t_late * 1e3:.1f} ms near token "
          f"{len(steps)} (x{t_late / t_early:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
