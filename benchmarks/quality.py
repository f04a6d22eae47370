"""Quality of 16-bit and int8 weights: held-out loss of a trained model in each precision, against float32.

    python benchmarks/quality.py                          # train 6 minutes on tinyshakespeare, then measure
    python benchmarks/quality.py --checkpoint runs/quality  # measure an existing checkpoint
    python benchmarks/quality.py --json

Random weights say little about quantization (their matrices have no outliers and their predictions are flat), so
this trains a model first: char tokens, d_model 256, 4 layers, context 64 (weight matrices wide enough that per-row
int8 scales and 7-bit activations are exercised), on ../shared/data/tinyshakespeare.txt. The held-out loss is the trainer's own
validation split (the last 10% of the text; its first 32768 tokens by default), scored in non-overlapping context windows. With llama-cpp-python
installed it also checks that llama.cpp, reading our GGUF export (f32), picks the same greedy tokens as we do.
The last rows score one token at a time, as batch-1 decoding runs: int8 through kernels.cpp's one-row product
(activations quantized per block of 32) rather than fbgemm's several-row one (one 7-bit scale per call); bfloat16
through its 16-bit KV cache (keys and values rounded to bfloat16 as they are stored).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
PRECISIONS = (("float32", {}), ("bfloat16", {"dtype": "bfloat16"}), ("float16", {"dtype": "float16"}),
              ("int8", {"quantize": "int8"}), ("bfloat16 + int8", {"dtype": "bfloat16", "quantize": "int8"}),
              ("int8, a token a step", {"quantize": "int8", "one_token": True}),
              ("bfloat16, a token a step", {"dtype": "bfloat16", "one_token": True}))


def train_model(out: Path, data: Path, seconds: float, log) -> None:
    from tinyformer.model import preset
    from tinyformer.train import TrainConfig, train

    config = preset("tiny", d_model=256, n_layers=4, n_heads=8)
    log(f"training d_model 256 x 4 layers on {data} for {seconds:.0f} s -> {out}")
    train(config, TrainConfig(data=str(data), tokenizer="char", time_budget=seconds, lr=3e-3, batch_size=16,
                              warmup_steps=50, eval_interval=10**9, seed=1337),
          out, progress=False, overwrite=True, log=lambda *a, **k: None)


def held_out_loss(lm, text: str, val_fraction: float, max_tokens: int, one_token: bool = False) -> tuple[float, int]:
    """Mean cross-entropy over non-overlapping windows; one_token: each window fed a token at a time through the KV
    cache, as decoding runs (int8 then goes through the one-row kernel, not the several-row one)."""
    from tinyformer.data import TokenData
    from tinyformer.generation.cache import KVCache
    from tinyformer.model.quant import cache_dtype

    window = lm.model.config.context_length
    ids = TokenData.from_text(text, lm.tokenizer, val_fraction, window).val.long()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, min(len(ids) - 1, max_tokens), window):
            chunk = ids[start:start + window + 1]
            if len(chunk) < 2:
                break
            if one_token:
                cache = KVCache(lm.model.config, 1, window, cache_dtype(lm.model))
                logits = torch.cat([lm.model(chunk[None, t:t + 1], cache=cache).float()
                                    for t in range(len(chunk) - 1)], dim=1)
            else:
                logits = lm.model(chunk[None, :-1]).float()
            total += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    return total / count, count


def llama_cpp_tokens_match(lm, prompt: str, new: int) -> bool | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from tinyformer.interop.gguf import export_gguf

    path = Path(tempfile.mkdtemp(prefix="tinyformer-quality-")) / "model.gguf"
    export_gguf(lm.model, lm.tokenizer, path, quantize="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=lm.model.config.context_length, verbose=False)
    ids = lm.tokenizer.encode(prompt)
    new = min(new, lm.model.config.context_length - len(ids))  # llama.cpp's gpt2 cannot go past its positions
    ours = lm.generate([ids], max_new_tokens=new, temperature=0, details=True)[0].token_ids
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    return theirs == ours


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="measure this checkpoint (no training)")
    parser.add_argument("--train-seconds", type=float, default=360.0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--max-tokens", type=int, default=32768, help="score the first N held-out tokens")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else (lambda *a: print(*a, flush=True))
    import tinyformer
    from tinyformer.model.quant import weight_bytes

    if not args.data.is_file():
        print(f"quality: error: {args.data} not found (it lives in ../shared/data)", file=sys.stderr)
        return 1
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = Path(tempfile.mkdtemp(prefix="tinyformer-quality-")) / "run"
        train_model(checkpoint, args.data, args.train_seconds, log)
    text = args.data.read_text(encoding="utf-8")
    val_fraction = (json.loads((checkpoint / "config.json").read_text()).get("train") or {}).get("val_fraction", 0.1)
    rows = []
    for name, options in PRECISIONS:
        options = dict(options)
        one_token = options.pop("one_token", False)
        lm = tinyformer.load(checkpoint, device="cpu", **options)
        loss, tokens = held_out_loss(lm, text, val_fraction, args.max_tokens, one_token)
        rows.append({"precision": name, "val_loss": loss, "weight_bytes": weight_bytes(lm.model), "tokens": tokens})
        log(f"  {name:<16} held-out loss {loss:.4f}")
    reference = rows[0]["val_loss"]
    for row in rows:
        row["relative_change"] = row["val_loss"] / reference - 1
        row["within_1_percent"] = abs(row["relative_change"]) <= 0.01
    match = llama_cpp_tokens_match(tinyformer.load(checkpoint, device="cpu"), "ROMEO:\n", 200)
    result = {"checkpoint": str(checkpoint), "rows": rows, "llama_cpp_f32_greedy_tokens_equal": match,
              "perplexity_float32": math.exp(reference)}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print()
    print(f"held-out loss on {args.data.name} (last {val_fraction:.0%}, {rows[0]['tokens']:,} tokens), {checkpoint}")
    print("| precision | weights MB | held-out loss | vs float32 | within 1% |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['weight_bytes'] / 1e6:.2f} | {r['val_loss']:.4f} | "
              f"{100 * r['relative_change']:+.2f}% | {'yes' if r['within_1_percent'] else 'NO'} |")
    print("llama.cpp f32 greedy tokens (to the end of the context, from 'ROMEO:\\n') equal ours: "
          + ("not checked (pip install llama-cpp-python)" if match is None else str(match)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
