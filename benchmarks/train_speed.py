"""Training speed against nanoGPT's CPU recipe: tinyshakespeare (char level, first 90% train), 4 layers / 4 heads /
d_model 128 / context 64. nanoGPT's measured reference on this machine is val loss 1.886 after 2000 iterations of
batch 12 in 104 s (issue 10). Each setting trains that model with the `tiny` preset's training settings (ours:
batch 16, Muon, warmup-stable-decay; see PRESET_TRAINING) under a wall-clock budget; "adamw (old default)" is the
preset before Muon (AdamW lr 5e-3, batch 12, warmup + cosine to lr/10), for comparison in the same run.

    python benchmarks/train_speed.py                  # every setting at 100 s, default at 50 s too, then DDP
    python benchmarks/train_speed.py --seconds 20 --short 0 --ddp-steps 0      # a smoke run
    python benchmarks/train_speed.py --only default bfloat16 --short 0
    python benchmarks/train_speed.py --only --short 0                          # only the DDP throughput

Prints, per run: tokens/s (training steps only, from metrics.jsonl), the wall time to reach val loss 1.886, the val
loss at 50 s and 100 s of training-loop time (the last eval at or before it) and at the end. Every wall time counts
the whole training loop: steps, evals (every 100 steps, 20 batches of fixed held-out windows, ~20k tokens) and
checkpoints, and for --compile the compilation. "full val" re-scores the final checkpoint on the whole held-out 10%
(111k characters, non-overlapping 64-character windows, not timed) to show the 20-batch estimate is honest. Then
2-process DDP (torchrun, gloo) throughput against 1 process on the same global batch. Time it alone, one locked
command per setting: `flock /tmp/timing.lock python benchmarks/train_speed.py --only default --short 0 --ddp-steps 0`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 1.886
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
MODEL = dict(d_model=128, n_layers=4, n_heads=4, context_length=64, dropout=0.0)
SETTINGS = {  # name -> TrainConfig overrides on top of the tiny preset's training settings
    "default": {},
    "bfloat16": dict(dtype="bfloat16"),
    "compile": dict(compile=True),
    "bfloat16+compile": dict(dtype="bfloat16", compile=True),
    "adamw (old default)": dict(optimizer="adamw", lr=5e-3, batch_size=12, decay="cosine", min_lr=None, cooldown=1.0),
}


def run(name: str, overrides: dict, seconds: float, root: Path) -> dict:
    from tinyformer.model import ModelConfig
    from tinyformer.train import PRESET_TRAINING, TrainConfig, train

    config = TrainConfig(**{**PRESET_TRAINING["tiny"], "data": str(DATA), "tokenizer": "char",
                            "time_budget": seconds, "eval_interval": 100, "eval_iters": 20, "device": "cpu",
                            **overrides})
    out = root / f"{name}-{seconds:g}s".replace(" ", "_")
    summary = train(ModelConfig(**MODEL), config, out, progress=False, log=None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["val_loss"] is not None]
    speeds = sorted(r["tokens_per_s"] for r in records if r["tokens_per_s"])

    def val_at(t):
        done = [r["val_loss"] for r in evals if r["elapsed"] <= t]
        return done[-1] if done and t <= summary["seconds"] + 1 else None

    reached = next((r["elapsed"] for r in evals if r["val_loss"] <= TARGET), None)
    return {"setting": name, "budget_s": seconds, "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
            "to_1.886_s": reached, "val_50s": val_at(50), "val_100s": val_at(100), "final_val": summary["val_loss"],
            "full_val": full_val_loss(out), "steps": summary["steps"], "seconds": summary["seconds"]}


def full_val_loss(checkpoint: Path) -> float:
    """The checkpoint's loss on the whole held-out split, in non-overlapping context-length windows."""
    import torch
    import torch.nn.functional as F

    from tinyformer.checkpoint import load_checkpoint
    from tinyformer.data import TokenData

    model, tokenizer, _ = load_checkpoint(checkpoint)
    ctx = model.config.context_length
    val = TokenData.from_text(DATA.read_text(encoding="utf-8"), tokenizer, 0.1, ctx).val.long()
    count = (len(val) - 1) // ctx * ctx
    inputs, targets = val[:count].view(-1, ctx), val[1:count + 1].view(-1, ctx)
    with torch.inference_mode():
        return sum(F.cross_entropy(model(input_ids=x).flatten(0, 1), y.flatten(), reduction="sum").item()
                   for x, y in zip(inputs.split(256), targets.split(256))) / count


def ddp_throughput(processes: int, steps: int, root: Path) -> float:
    """Median tokens/s of a torchrun run with `processes` processes (global batch 32 windows, the tiny preset's
    training settings) for `steps` steps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / f"ddp{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "tinyformer", "train", "--data", str(DATA),
               "--quiet", "--out", str(out), "--max-steps", str(steps), "--eval-interval", str(steps),
               "--log-interval", "10", "--batch-size", str(32 // processes), "--device", "cpu"]
    command += [x for k, v in MODEL.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["tokens_per_s"] for r in records if r["tokens_per_s"])
    return speeds[len(speeds) // 2]


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=100.0, help="training budget per setting (default 100)")
    parser.add_argument("--short", type=float, default=50.0,
                        help="also train the default setting with this budget (default 50; 0: skip)")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS),
                        help="settings to run (default: all; none: only DDP)")
    parser.add_argument("--ddp-steps", type=int, default=100, help="steps of each DDP throughput run (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not available", file=sys.stderr)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        names = list(SETTINGS) if args.only is None else args.only
        if args.short and "default" in names:
            rows.append(run("default", SETTINGS["default"], args.short, Path(tmp)))
        for name in names:
            rows.append(run(name, SETTINGS[name], args.seconds, Path(tmp)))
        ddp = {}
        if args.ddp_steps:
            ddp = {n: ddp_throughput(n, args.ddp_steps, Path(tmp)) for n in (1, 2)}
    if args.json:
        print(json.dumps({"settings": rows, "ddp_tokens_per_s": ddp}, indent=2))
        return 0
    print(f"nanoGPT CPU recipe model; nanoGPT reference: val {TARGET} in 104 s")
    print(f"{'setting':<20} {'budget':>6} {'tok/s':>7} {'t->1.886':>9} {'val@50s':>8} {'val@100s':>9} {'final':>6} "
          f"{'full val':>8} {'steps':>6}")
    for r in rows:
        print(f"{r['setting']:<20} {r['budget_s']:>5g}s {fmt(r['tokens_per_s'], ',.0f'):>7} "
              f"{fmt(r['to_1.886_s'], '.1f'):>9} {fmt(r['val_50s'], '.3f'):>8} {fmt(r['val_100s'], '.3f'):>9} "
              f"{r['final_val']:>6.3f} {r['full_val']:>8.3f} {r['steps']:>6}")
    base = next((r["tokens_per_s"] for r in rows if r["setting"] == "default" and r["budget_s"] == args.seconds), None)
    for r in rows:
        if base and r["tokens_per_s"] and r["setting"] != "default":
            print(f"  {r['setting']} / default throughput: {r['tokens_per_s'] / base:.2f}x")
    if ddp:
        print(f"DDP (global batch 32): 1 process {ddp[1]:,.0f} tok/s, 2 processes {ddp[2]:,.0f} tok/s "
              f"({ddp[2] / ddp[1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
