"""Serving under load: `tinyformer serve` with continuous batching, one request at a time, and llama.cpp's server.

    python benchmarks/serve_load.py            # the table
    python benchmarks/serve_load.py --json     # machine-readable
    python benchmarks/serve_load.py --quick    # 8 requests of 16 tokens (smoke run)

A random GPT-2-124M-shaped model (float32, CPU; seeded, so every server gets the same weights) is served on
127.0.0.1 in a child process. 32 requests (text prompts of 16 tokens, 64 greedy tokens each, streamed) are sent by
8 concurrent clients, then the same 32 one at a time. Per scenario: throughput (generated tokens / wall time),
p50/p95 request latency and p50/p95 time to first token.

The tokenizer is a character vocabulary of GPT-2's size (50257: four specials, newline, printable ASCII, CJK
ideographs), so llama.cpp, which takes text prompts only, reads the same 16 tokens we do (one per character; the
GGUF export writes it as byte-level BPE). <eos>'s row of the tied embedding is zero: its logit is 0, far below the
largest of 50k random logits, so greedy decoding never ends a request before its 64 tokens.

llama.cpp row: the same weights and precision (`tinyformer.interop.gguf.export_gguf(..., quantize="f32")`, what
`tinyformer export CKPT out.gguf --format gguf` writes) served by llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`) under the same load. That server has no parallel decoding (no n_parallel or
continuous batching: one model behind a lock); its one concurrency option is --interrupt_requests, which by default
cuts a running stream off when another request arrives, so it runs with --interrupt_requests False: concurrent
requests queue and each completes, the fairest setting it offers. Requests there set repeat_penalty 1.0 (its
default is 1.1), so both servers compute plain greedy decoding. Needs `pip install 'tinyformer[bench]'`; without it
the row is skipped with a message. Every request has a timeout and the counts are fixed.
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


def characters() -> list[str]:
    """The tokenizer's 50253 characters: newline, printable ASCII, the CJK ideographs, then CJK extension B."""
    chars = ["\n"] + [chr(c) for c in range(0x20, 0x7F)] + [chr(c) for c in range(0x4E00, 0xA000)]
    return chars + [chr(c) for c in range(0x20000, 0x20000 + VOCAB - 4 - len(chars))]


def build_lm():
    import torch

    from tinyformer import GPT, LanguageModel, preset
    from tinyformer.tokenizers import CharTokenizer

    tokenizer = CharTokenizer(characters())
    assert tokenizer.vocab_size == VOCAB
    torch.manual_seed(SEED)
    model = GPT(preset("gpt2", vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_id] = 0  # tied with the embedding: <eos>'s logit is always 0
    return LanguageModel(model, tokenizer, source="gpt2-124m-random")


def make_prompts(count: int) -> list[str]:
    """Seeded prompts of 16 CJK ideographs: 16 tokens for both tokenizers."""
    import random

    rng = random.Random(SEED)
    return ["".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(16)) for _ in range(count)]


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


def one_request(base: str, model: str, prompt: str, tokens: int, extra: dict) -> dict:
    """Stream one completion; -> start, first-token and end times, generated tokens and text, error.
    Generated tokens are the usage count when the server streams one, else the chunks that carried text (one
    character token each here)."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, **extra}
    started, first, usage, error, chunks, text = time.perf_counter(), None, None, None, 0, ""
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
                for choice in chunk.get("choices") or []:
                    chunks += bool(choice.get("text"))
                    text += choice.get("text") or ""
    except Exception as e:  # counted and shown, not raised: the table reports errors
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    generated = usage["completion_tokens"] if usage else chunks
    if error is None and generated != tokens:
        error = f"generated {generated} tokens, asked {tokens}"
    return {"start": started, "ttft": (first or end) - started, "latency": end - started, "tokens": generated,
            "text": text, "error": error}


def run_load(base: str, model: str, prompts: list[str], tokens: int, clients: int, extra: dict) -> dict:
    one_request(base, model, prompts[0], 4, extra)  # warm up (first-call allocations)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(base, model, p, tokens, extra), prompts))
    wall = time.perf_counter() - started
    ok = [r for r in results if r["error"] is None]
    errors = [r["error"] for r in results if r["error"] is not None]

    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    lat, ttft = [r["latency"] for r in ok] or [float("nan")], [r["ttft"] for r in ok] or [float("nan")]
    return {"clients": clients, "requests": len(prompts), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall, "tokens": sum(r["tokens"] for r in ok), "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "p50_latency_s": pct(lat, 50), "p95_latency_s": pct(lat, 95), "p50_ttft_s": pct(ttft, 50),
            "p95_ttft_s": pct(ttft, 95), "texts": [r["text"] for r in results]}


def serve_ours(port: int, max_batch: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(port),
                             "--max-batch", str(max_batch)])


def serve_llama_cpp(port: int, directory: str):
    """-> (process, None) or (None, reason it is skipped)."""
    try:
        import llama_cpp.server  # noqa: F401
        import sse_starlette  # noqa: F401  (the [server] extra)
    except ImportError:
        return None, "llama-cpp-python[server] is not installed: pip install 'tinyformer[bench]'"
    from tinyformer.interop.gguf import export_gguf

    path = os.path.join(directory, "gpt2-random-f32.gguf")
    lm = build_lm()
    notes = export_gguf(lm.model, lm.tokenizer, path, quantize="f32")
    if notes:
        return None, f"the GGUF export left something out: {'; '.join(notes)}"
    del lm
    threads = str(torch_threads())
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1",
                                "--port", str(port), "--n_ctx", "1024", "--n_threads", threads,
                                "--n_threads_batch", threads, "--model_alias", "gpt2-random",
                                "--interrupt_requests", "False"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return process, None


def torch_threads() -> int:
    """The threads our server computes with (torch's default, the physical cores): llama.cpp gets as many."""
    import torch

    return torch.get_num_threads()


BEGAN = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - BEGAN:5.0f} s] {message}", file=sys.stderr, flush=True)


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

    requests, tokens = (8, 16) if args.quick else (32, 64)
    prompts = make_prompts(requests)
    rows, notes = {}, []
    llama_row = "llama.cpp server (llama-cpp-python)"

    port = free_port()
    ours = serve_ours(port, args.max_batch)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base + "/health", ours)
        progress("our server is ready")
        usage = {"stream_options": {"include_usage": True}}
        rows["tinyformer, continuous batching"] = run_load(base, "gpt2-random", prompts, tokens, args.clients, usage)
        progress("8 concurrent clients done")
        rows["tinyformer, one at a time"] = run_load(base, "gpt2-random", prompts, tokens, 1, usage)
        progress("one at a time done")
    finally:
        stop(ours)
        progress("our server stopped")

    with tempfile.TemporaryDirectory(prefix="tinyformer-serve-bench-") as directory:
        port = free_port()
        llama, reason = serve_llama_cpp(port, directory)
        if llama is None:
            notes.append(f"llama.cpp rows skipped: {reason}")
        else:
            try:
                base = f"http://127.0.0.1:{port}"
                progress("GGUF exported")
                wait_ready(base + "/v1/models", llama)
                progress("llama.cpp's server is ready")
                rows[llama_row] = run_load(base, "gpt2-random", prompts, tokens, args.clients,
                                           {"repeat_penalty": 1.0})
            finally:
                stop(llama)
                progress("llama.cpp done")
            notes.append("llama.cpp server settings: --interrupt_requests False (it decodes one request at a time; "
                         f"it has no parallel-decoding option), --n_threads {torch_threads()}, f32 GGUF")

    batched = rows["tinyformer, continuous batching"]["tok_per_s"]
    ratios = {"vs one at a time": batched / rows["tinyformer, one at a time"]["tok_per_s"]}
    ours = rows["tinyformer, continuous batching"]["texts"]
    if llama_row in rows:
        ratios["vs llama.cpp"] = batched / rows[llama_row]["tok_per_s"]
        same = sum(a == b for a, b in zip(ours, rows[llama_row]["texts"]))
        notes.append(f"greedy texts equal to ours: llama.cpp {same}/{requests}, ours one at a time "
                     f"{sum(a == b for a, b in zip(ours, rows['tinyformer, one at a time']['texts']))}/{requests}")
    for r in rows.values():
        del r["texts"]
    if args.json:
        print(json.dumps({"requests": requests, "tokens": tokens, "rows": rows, "ratios": ratios, "notes": notes},
                         indent=2))
        return 0
    print(f"{requests} requests x {tokens} greedy tokens, prompts of 16 tokens, GPT-2-124M-shaped random model, "
          f"float32, {torch_threads()} CPU threads, {args.clients} concurrent clients")
    print()
    print("| server | clients | tok/s | p50 latency s | p95 latency s | p50 TTFT s | p95 TTFT s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['clients']} | {r['tok_per_s']:.1f} | {r['p50_latency_s']:.2f} | "
              f"{r['p95_latency_s']:.2f} | {r['p50_ttft_s']:.3f} | {r['p95_ttft_s']:.3f} | {r['errors']} |")
    print()
    targets = {"vs one at a time": 3.0, "vs llama.cpp": 2.0}
    for name, value in ratios.items():
        print(f"continuous batching {name}: {value:.2f}x (target >= {targets[name]:.0f}x)")
    for r in rows.values():
        if r["first_error"]:
            print(f"first error: {r['first_error'][0]}")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
