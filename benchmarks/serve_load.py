"""Serving under load: `tinyformer serve` with continuous batching, one request at a time, and llama.cpp's server.

    python benchmarks/serve_load.py            # the table
    python benchmarks/serve_load.py --json     # machine-readable
    python benchmarks/serve_load.py --quick    # 8 requests of 16 tokens (smoke run)

A random GPT-2-124M-shaped model (float32, CPU; seeded, so every server gets the same weights) is served on
127.0.0.1 in a child process. 32 requests (prompts of 16 token ids, 64 greedy tokens each, streamed, usage
included) are sent by 8 concurrent clients, then the same 32 one at a time. Per scenario: throughput (generated
tokens / wall time), p50/p95 request latency and p50/p95 time to first token. Token ids are GPT-2's range (< 50257),
text is decoded with cl100k_base, whose first 50257 ids are ordinary tokens, and <eos> is outside the model's
vocabulary, so every request generates exactly its 64 tokens.

llama.cpp rows (same weights and precision through `tinyformer.interop.gguf.export_gguf(..., quantize="f32")`,
served by llama-cpp-python's OpenAI-compatible server) need `pip install 'tinyformer[bench]'` and that export;
without either they are skipped with a message. Every request has a timeout and the counts are fixed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

SEED = 0
VOCAB = 50257


def build_lm():
    import torch

    from tinyformer import GPT, LanguageModel, get_tokenizer, preset

    torch.manual_seed(SEED)
    model = GPT(preset("gpt2", vocab_size=VOCAB)).eval()
    return LanguageModel(model, get_tokenizer("cl100k_base"), source="gpt2-124m-random")


def worker(port: int, max_batch: int) -> None:
    """Child process: serve the seeded model on 127.0.0.1:port until killed."""
    import uvicorn

    from tinyformer.server import Limits, create_app

    app = create_app(build_lm(), name="gpt2-random", limits=Limits(max_batch=max_batch, max_queue=256))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server at {url} did not become ready in {seconds:.0f} s")


def one_request(base: str, model: str, prompt: list[int], tokens: int) -> dict:
    """Stream one completion; -> start, first-token and end times, generated tokens, error."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started, first, usage, error = time.perf_counter(), None, None, None
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk.get("choices"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as e:  # counted and shown, not raised: the table reports errors
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    generated = usage["completion_tokens"] if usage else 0
    if error is None and generated != tokens:
        error = f"generated {generated} tokens, asked {tokens}"
    return {"start": started, "ttft": (first or end) - started, "latency": end - started, "tokens": generated,
            "error": error}


def run_load(base: str, model: str, prompts: list[list[int]], tokens: int, clients: int) -> dict:
    one_request(base, model, prompts[0], 4)  # warm up (first-call allocations)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(base, model, p, tokens), prompts))
    wall = time.perf_counter() - started
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]

    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    lat, ttft = [r["latency"] for r in ok] or [float("nan")], [r["ttft"] for r in ok] or [float("nan")]
    return {"clients": clients, "requests": len(prompts), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "tokens": sum(r["tokens"] for r in ok), "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "p50_latency_s": pct(lat, 50), "p95_latency_s": pct(lat, 95), "p50_ttft_s": pct(ttft, 50),
            "p95_ttft_s": pct(ttft, 95)}


def serve_ours(port: int, max_batch: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(port),
                             "--max-batch", str(max_batch)])


def serve_llama_cpp(port: int, directory: str):
    """-> (process, None) or (None, reason it is skipped)."""
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None, "llama-cpp-python[server] is not installed: pip install 'tinyformer[bench]'"
    try:
        from tinyformer.interop.gguf import export_gguf
    except ImportError:
        return None, ("tinyformer.interop.gguf.export_gguf is not available yet (the GGUF export, issue 7); "
                      "llama.cpp needs the same weights as a .gguf file")
    path = os.path.join(directory, "gpt2-random-f32.gguf")
    lm = build_lm()
    export_gguf(lm.model, lm.tokenizer, path, quantize="f32")
    del lm
    threads = str(os.cpu_count() or 1)
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1",
                                "--port", str(port), "--n_ctx", "1024", "--n_threads", threads,
                                "--n_threads_batch", threads, "--model_alias", "gpt2-random"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, None


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="8 requests of 16 tokens (smoke run)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.max_batch)
        return 0

    import random

    requests, tokens = (8, 16) if args.quick else (32, 64)
    rng = random.Random(SEED)
    prompts = [[rng.randrange(VOCAB) for _ in range(16)] for _ in range(requests)]
    rows, notes = {}, []

    port = free_port()
    ours = serve_ours(port, args.max_batch)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health", ours)
        rows["tinyformer, continuous batching"] = run_load(base, "gpt2-random", prompts, tokens, args.clients)
        rows["tinyformer, one at a time"] = run_load(base, "gpt2-random", prompts, tokens, 1)
    finally:
        stop(ours)

    with tempfile.TemporaryDirectory(prefix="tinyformer-serve-bench-") as directory:
        port = free_port()
        llama, reason = serve_llama_cpp(port, directory)
        if llama is None:
            notes.append(f"llama.cpp rows skipped: {reason}")
        else:
            try:
                base = f"http://127.0.0.1:{port}"
                wait_ready(base + "/v1/models", llama)
                rows["llama.cpp server (llama-cpp-python)"] = run_load(base, "gpt2-random", prompts, tokens,
                                                                       args.clients)
            finally:
                stop(llama)

    batched = rows["tinyformer, continuous batching"]["tok_per_s"]
    ratios = {"vs one at a time": batched / rows["tinyformer, one at a time"]["tok_per_s"]}
    if "llama.cpp server (llama-cpp-python)" in rows:
        ratios["vs llama.cpp"] = batched / rows["llama.cpp server (llama-cpp-python)"]["tok_per_s"]
    if args.json:
        print(json.dumps({"requests": requests, "tokens": tokens, "rows": rows, "ratios": ratios, "notes": notes},
                         indent=2))
        return 0
    print(f"{requests} requests x {tokens} greedy tokens, prompts of 16 tokens, GPT-2-124M-shaped random model, "
          f"float32, {os.cpu_count()} CPU threads")
    print()
    print("| server | clients | tok/s | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['clients']} | {r['tok_per_s']:.1f} | {r['p50_latency_s']:.2f} | "
              f"{r['p95_latency_s']:.2f} | {r['p50_ttft_s']:.3f} | {r['p95_ttft_s']:.3f} | {r['errors']} |")
    print()
    for name, value in ratios.items():
        print(f"continuous batching {name}: {value:.2f}x")
    for r in rows.values():
        if r["first_error"]:
            print(f"first error: {r['first_error'][0]}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
