"""Run one engine's timings in a process of its own and return what it reports.

Engines measured in one process disturb each other: CTranslate2 ships its own OpenMP runtime and llama.cpp its own
thread pool, whose threads stay awake for a while after a call and steal the cores from whichever engine runs next
(measured on benchmarks/translate.py: CTranslate2 float32 batch 1 ran at 5.4 sentences/s when it shared the
process, 12.0 on its own; tinyformer 4.3 against 6.0). So each benchmark runs every engine in a fresh process of its
own, one after another, never two at once.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


class WorkerFailed(RuntimeError):
    def __init__(self, arguments: list[str], returncode: int, stderr: str):
        how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with {returncode}"
        super().__init__(f"worker {arguments} {how}:\n{stderr[-3000:]}")
        self.returncode = returncode


def run_worker(script: str, arguments: list[str]) -> dict:
    """`python SCRIPT --worker ARGUMENTS...` must print one JSON object on its last stdout line."""
    done = subprocess.run([sys.executable, script, "--worker", *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise WorkerFailed(arguments, done.returncode, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(result: dict) -> None:
    print(json.dumps(result), flush=True)


def positive_int(text: str) -> int:
    """argparse type for --rounds / --repeats: a count of at least 1, or one clear line naming the bad value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value
