"""Training speed against nanoGPT's CPU recipe: tinyshakespeare (char level, first 90% train), 4 layers / 4 heads /
d_model 128 / context 64, batch 12. One run per setting with a wall-clock budget; nanoGPT's measured reference on
this machine is val loss 1.886 after 2000 iterations in 104 s (issue 10).

    python benchmarks/train_speed.py                  # 100 s per setting, every setting, then 2-process DDP
    python benchmarks/train_speed.py --seconds 20     # a smoke run
    python benchmarks/train_speed.py --only default bfloat16

Prints, per setting: tokens/s (training steps only, from metrics.jsonl), wall time to reach val loss 1.886, val loss
at 50 s and 100 s of training-loop time (the last eval at or before it), and the final val loss; then 2-process DDP
(torchrun, gloo) throughput against 1 process on the same global batch. Time it alone:
`flock /tmp/timing.lock python benchmarks/train_speed.py`.
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
SETTINGS = {  # name -> TrainConfig overrides on top of the tiny preset's training settings with batch 12
    "default": {},
    "bfloat16": dict(dtype="bfloat16"),
    "compile": dict(compile=True),
    "bfloat16+compile": dict(dtype="bfloat16", compile=True),
}


def run(name: str, overrides: dict, seconds: float, root: Path) -> dict:
    from tinyformer.model import ModelConfig
    from tinyformer.train import PRESET_TRAINING, TrainConfig, train

    config = TrainConfig(**{**PRESET_TRAINING["tiny"], "batch_size": 12, "data": str(DATA), "tokenizer": "char",
                            "time_budget": seconds, "eval_interval": 100, "eval_iters": 20, "device": "cpu",
                            **overrides})
    out = root / name
    summary = train(ModelConfig(**MODEL), config, out, progress=False, log=None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["val_loss"] is not None]
    speeds = sorted(r["tokens_per_s"] for r in records if r["tokens_per_s"])

    def val_at(t):
        done = [r["val_loss"] for r in evals if r["elapsed"] <= t]
        return done[-1] if done and t <= summary["seconds"] + 1 else None

    reached = next((r["elapsed"] for r in evals if r["val_loss"] <= TARGET), None)
    return {"setting": name, "tokens_per_s": speeds[len(speeds) // 2] if speeds else None, "to_1.886_s": reached,
            "val_50s": val_at(50), "val_100s": val_at(100), "final_val": summary["val_loss"],
            "steps": summary["steps"], "seconds": summary["seconds"]}


def ddp_throughput(processes: int, steps: int, root: Path) -> float:
    """Median tokens/s of a torchrun run with `processes` processes (global batch 24 windows) for `steps` steps."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / f"ddp{processes}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(port), "-m", "tinyformer", "train", "--data", str(DATA),
               "--quiet", "--out", str(out), "--max-steps", str(steps), "--eval-interval", str(steps),
               "--log-interval", "10", "--batch-size", str(24 // processes), "--device", "cpu"]
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
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="settings to run (default: all)")
    parser.add_argument("--ddp-steps", type=int, default=100, help="steps of each DDP throughput run (0: skip)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} not available", file=sys.stderr)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or SETTINGS:
            rows.append(run(name, SETTINGS[name], args.seconds, Path(tmp)))
        ddp = {}
        if args.ddp_steps:
            ddp = {n: ddp_throughput(n, args.ddp_steps, Path(tmp)) for n in (1, 2)}
    if args.json:
        print(json.dumps({"settings": rows, "ddp_tokens_per_s": ddp}, indent=2))
        return 0
    print(f"nanoGPT CPU recipe, {args.seconds:g} s budget per setting; nanoGPT reference: val {TARGET} in 104 s")
    print(f"{'setting':<18} {'tok/s':>8} {'t->1.886':>9} {'val@50s':>8} {'val@100s':>9} {'final':>7} {'steps':>6}")
    for r in rows:
        print(f"{r['setting']:<18} {fmt(r['tokens_per_s'], ',.0f'):>8} {fmt(r['to_1.886_s'], '.1f'):>9} "
              f"{fmt(r['val_50s'], '.3f'):>8} {fmt(r['val_100s'], '.3f'):>9} {r['final_val']:>7.3f} {r['steps']:>6}")
    base = rows[0]["tokens_per_s"] if rows else None
    for r in rows[1:]:
        if base and r["tokens_per_s"]:
            print(f"  {r['setting']} / default throughput: {r['tokens_per_s'] / base:.2f}x")
    if ddp:
        print(f"DDP (global batch 24): 1 process {ddp[1]:,.0f} tok/s, 2 processes {ddp[2]:,.0f} tok/s "
              f"({ddp[2] / ddp[1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
