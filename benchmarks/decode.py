"""Decode speed against llama.cpp, CTranslate2 and transformers on the same random GPT-2-124M weights, one run.

    python benchmarks/decode.py               # engines x precisions, batch 1 and 8 (the table below)
    python benchmarks/decode.py --json        # machine-readable
    python benchmarks/decode.py --quick       # fewer tokens, for a smoke run
    python benchmarks/decode.py --scenarios   # tinyformer vs transformers: sampling, beams, uncached contexts

Greedy, a 32-token prompt, 128 new tokens (every engine is made to ignore <eos>), all threads of the machine. Each
engine runs in a process of its own, one after another (benchmarks/isolated.py says why), in --rounds passes
through all engines; each cell is the best of its runs (--repeats per round, after a warm-up).
The peers are bench extras (`pip install -e '.[bench]'`; llama-cpp-python compiles llama.cpp, ~10 minutes):
- llama.cpp through llama-cpp-python, on our weights written by tinyformer's GGUF export at f32, f16 and q8_0
  (batch 1: its Python API decodes one sequence);
- CTranslate2, on the Hugging Face directory converted by its TransformersConverter at float32 and int8 (the
  converter reads the vocabulary through AutoTokenizer: the directory gets a placeholder vocab.json whose first
  256 tokens are GPT-2's byte alphabet, and an empty merges.txt);
- transformers (float32).
A missing peer's rows are skipped with the command that installs it. Our float32 greedy tokens are checked
against llama.cpp f32's. The bandwidth ceiling is the copy bandwidth measured in the same run divided by the bytes
of weights a token reads: a batch-1 decoder reads every weight matrix (the output matrix included) once per token,
and one row of the embeddings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import signal

import torch
from isolated import WorkerFailed, positive_int, report as report_worker, run_worker

VOCAB = 50257
NO_EXTRA_BUFFERS = "TINYFORMER_BENCH_LLAMA_NO_EXTRA_BUFFERS"  # set for a llama.cpp worker whose AMX path crashed


def copy_bandwidth(megabytes: int = 256, repeats: int = 8) -> float:
    """Bytes per second moved by a large tensor copy (read + write), best of several."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * 4 / best


def read_bandwidth(megabytes: int, repeats: int = 8) -> float:
    """Bytes per second two threads read summing a tensor of this size, best of several: 64 MB stays in a large
    last-level cache, 1 GB comes from memory. Other tenants of a VM's host move both by 20-40% from hour to hour,
    and bandwidth-bound engines (ours) with them more than overhead-bound ones."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()
    return x.numel() * 4 / min(_timed(x.sum) for _ in range(repeats))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build_hf_directory(seed: int, directory: Path):
    """Random GPT-2-124M saved as a Hugging Face directory with a placeholder byte-level vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    hf = GPT2LMHeadModel(config).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(directory)
    from tinyformer.tokenizers import _BYTE_DECODER

    alphabet = sorted(_BYTE_DECODER, key=_BYTE_DECODER.get)
    vocab = {token: i for i, token in enumerate(alphabet + [f"<t{i}>" for i in range(256, VOCAB - 1)]
                                                + ["<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    return hf, vocab


# ------------------------------------------------------------------------------------------------------ engines

def ours(lm):
    def run(prompts, new):
        out = []
        seconds = _timed(lambda: out.extend(lm.generate(prompts, max_new_tokens=new, temperature=0, details=True)))
        return seconds, [r.token_ids for r in out]
    return run


def transformers_engine(hf):
    def run(prompts, new):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            result = []
            seconds = _timed(lambda: result.append(hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                               max_new_tokens=new, min_new_tokens=new)))
        return seconds, result[0][:, ids.shape[1]:].tolist()
    return run


def llama_cpp_engine(path: Path, threads: int, extra_buffers: bool = True):
    """extra_buffers False: llama.cpp without its extra weight layouts (use_extra_bufts), i.e. without its AMX
    kernels, which crash with SIGILL in llama-cpp-python 0.3.36 on AMX CPUs (the tile configuration is built on the
    stack and compiled away: ggml-org/llama.cpp PR 26954). On x86 those layouts serve only AMX for q8_0 and nothing
    for f32/f16, so this is the llama.cpp a build without AMX gives (its AVX-512/VNNI kernels)."""
    import llama_cpp
    import llama_cpp.llama as api

    defaults = api.llama_cpp.llama_model_default_params
    if not extra_buffers:
        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params
        api.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_batch=64, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
    finally:
        api.llama_cpp.llama_model_default_params = defaults

    def run(prompts, new):
        assert len(prompts) == 1, "llama-cpp-python decodes one sequence"
        tokens = []

        def go():
            llm.reset()
            for token in llm.generate(prompts[0], temp=0.0, top_k=1, reset=True):
                tokens.append(token)
                if len(tokens) == new:
                    break
        return _timed(go), [tokens]
    return run


def ctranslate2_engine(directory: Path, compute_type: str, threads: int, vocab: dict):
    import ctranslate2

    generator = ctranslate2.Generator(str(directory), device="cpu", compute_type=compute_type,
                                      intra_threads=threads)
    names = {i: t for t, i in vocab.items()}

    def run(prompts, new):
        start = [[names[i] for i in p] for p in prompts]
        results = []
        seconds = _timed(lambda: results.extend(generator.generate_batch(
            start, max_length=new, min_length=new, sampling_topk=1, include_prompt_in_result=False,
            end_token=[])))
        return seconds, [r.sequences_ids[0] for r in results]
    return run


def missing(name: str, install: str, log) -> None:
    log(f"  (skipping {name}: not installed; {install})")


# ------------------------------------------------------------------------------------------------------- main

PRECISIONS = {"float32": {}, "bfloat16": {"dtype": "bfloat16"}, "int8": {"quantize": "int8"}}


def prompts(seed: int):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (32,), generator=generator).tolist()
    return prompt, torch.randint(0, VOCAB, (8, 32), generator=generator).tolist()


def make_engine(name: str, work: Path, threads: int):
    """-> (run, batch sizes) for one engine on the files peers_table wrote in `work`."""
    kind, precision = name.rsplit(" ", 1)
    if kind == "tinyformer":
        import tinyformer

        return ours(tinyformer.load(work / "hf", device="cpu", **PRECISIONS[precision])), (1, 8)
    if kind == "transformers":
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(work / "hf").eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        return transformers_engine(hf), (1, 8)
    if kind == "llama.cpp":
        return llama_cpp_engine(work / f"gpt2-{precision}.gguf", threads, os.environ.get(NO_EXTRA_BUFFERS) != "1"), (1,)
    vocab = json.loads((work / "hf" / "vocab.json").read_text())
    return ctranslate2_engine(work / "ct2", precision, threads, vocab), (1, 8)


def worker(args) -> list:
    """One engine in a process of its own (benchmarks/isolated.py): a warm-up, then each batch size, best of
    --repeats runs."""
    run, batches = make_engine(args.worker, Path(args.work), torch.get_num_threads())
    prompt, batch8 = prompts(args.seed)
    run([prompt], 4)  # warm up: first calls allocate and pick kernels
    rows = []
    for batch in batches:
        best, out = float("inf"), None
        for _ in range(args.repeats):
            seconds, out = run([prompt] if batch == 1 else batch8, args.new)
            best = min(best, seconds)
        rows.append({"engine": args.worker, "batch": batch, "tokens": sum(len(t) for t in out),
                     "tok_s": sum(len(t) for t in out) / best, "first": out[0]})
    return rows


def matrix_bytes(model) -> int:
    """Bytes of the weight matrices (with their scales and biases) a batch-1 decode step reads once each."""
    from tinyformer.model.quant import linears

    tensors = {t.data_ptr(): t for m in linears(model) for t in (m.weight, m.weight_scale, m.bias) if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def peers_table(args, log) -> dict:
    import tinyformer
    from tinyformer.interop.gguf import export_gguf

    threads = torch.get_num_threads()
    new = 128 // (4 if args.quick else 1)
    work = Path(tempfile.mkdtemp(prefix="tinyformer-bench-"))
    log(f"torch {torch.__version__}, {threads} threads; building GPT-2 124M (random weights) in {work} ...")
    build_hf_directory(args.seed, work / "hf")
    names = [f"tinyformer {p}" for p in PRECISIONS] + ["transformers float32"]
    float_model = tinyformer.load(work / "hf", device="cpu")
    weights = {p: matrix_bytes(tinyformer.load(work / "hf", device="cpu", **o).model) for p, o in PRECISIONS.items()}
    try:
        import llama_cpp  # noqa: F401

        for q in ("f32", "f16", "q8_0"):
            export_gguf(float_model.model, float_model.tokenizer, work / f"gpt2-{q}.gguf", quantize=q)
            names.append(f"llama.cpp {q}")
    except ImportError:
        missing("llama.cpp", "pip install llama-cpp-python  (or: pip install -e '.[bench]')", log)
    try:
        import ctranslate2

        ctranslate2.converters.TransformersConverter(str(work / "hf")).convert(str(work / "ct2"), force=True)
        names += ["CTranslate2 float32", "CTranslate2 int8"]
    except ImportError:
        missing("CTranslate2", "pip install ctranslate2  (or: pip install -e '.[bench]')", log)
    del float_model

    rows, tokens = {}, {}
    log(f"measuring (greedy, 32-token prompt, {new} new tokens; each engine in a process of its own, "
        f"{args.rounds} rounds through all engines, best of each engine's {args.rounds * args.repeats} runs) ...")
    # Rounds, not one engine's runs back to back: this VM's speed drifts by up to ~20% over minutes (measured: the
    # same int8 decode at 13.3 and 16.5 ms a step ten minutes apart), so every engine gets samples spread over the
    # whole measurement and a slow spell cannot land on one engine alone.
    notes = []
    for name in [n for n in names if n.startswith("llama.cpp")]:  # a short run first: does it run on this CPU?
        try:
            run_worker(__file__, [name, "--work", str(work), "--new", "2", "--seed", str(args.seed), "--repeats", "1"])
        except WorkerFailed as failure:
            if failure.returncode != -signal.SIGILL:
                raise
            os.environ[NO_EXTRA_BUFFERS] = "1"  # inherited by every llama.cpp worker from here on
            notes.append(f"{name} died of SIGILL in its AMX kernels (a llama.cpp bug on AMX CPUs, ggml-org/llama.cpp "
                         "PR 26954), so every llama.cpp row runs without its extra weight layouts "
                         "(use_extra_bufts=False: its AVX-512/VNNI kernels, as a build without AMX gives)")
            log("  " + notes[-1])
            break
    for round_ in range(args.rounds):
        for name in names:
            for row in run_worker(__file__, [name, "--work", str(work), "--new", str(new), "--seed", str(args.seed),
                                             "--repeats", str(args.repeats)])["rows"]:
                if row["batch"] == 1:
                    tokens[name] = row["first"]
                key = (name, row["batch"])
                row = {k: v for k, v in row.items() if k != "first"}
                if key not in rows or row["tok_s"] > rows[key]["tok_s"]:
                    rows[key] = row
                log(f"  round {round_ + 1}: {name:<24} batch {row['batch']}: {row['tok_s']:8.2f} tok/s")
    rows = list(rows.values())

    def best(prefix, batch):
        rates = [r["tok_s"] for r in rows if r["engine"].startswith(prefix) and r["batch"] == batch]
        return max(rates) if rates else None

    def rate(name, batch):
        return next((r["tok_s"] for r in rows if r["engine"] == name and r["batch"] == batch), None)

    targets = [("tinyformer float32", 1, "llama.cpp f32", 0.8), ("tinyformer bfloat16", 1, "llama.cpp f16", 1.0),
               ("tinyformer int8", 1, "llama.cpp q8_0", 1.0)]
    ratios = []
    for name, batch, peer, goal in targets:
        if rate(peer, batch):
            ratios.append({"ours": name, "batch": batch, "peer": peer, "ratio": rate(name, batch) / rate(peer, batch),
                           "target": goal})
    fastest_ct2 = max(("CTranslate2 float32", "CTranslate2 int8"), key=lambda n: rate(n, 8) or 0)
    if rate(fastest_ct2, 8):
        for precision in ("float32", "bfloat16", "int8"):
            ratios.append({"ours": f"tinyformer {precision}", "batch": 8, "peer": fastest_ct2,
                           "ratio": rate(f"tinyformer {precision}", 8) / rate(fastest_ct2, 8), "target": 1.0})
    bandwidth = copy_bandwidth()
    summary = {"torch": torch.__version__, "threads": threads, "new_tokens": new, "notes": notes,
               "copy_bandwidth_gb_s": bandwidth / 1e9,
               "matrix_bytes": weights,
               "float32_tokens_equal_llama_cpp_f32": (tokens.get("tinyformer float32") == tokens["llama.cpp f32"]
                                                      if "llama.cpp f32" in tokens else None),
               "float32_tokens_equal_transformers": tokens["tinyformer float32"] == tokens["transformers float32"]}
    return {"rows": rows, "ratios": ratios, "summary": summary}


def print_table(result) -> None:
    rows, summary = result["rows"], result["summary"]
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    print()
    print("| engine, precision | batch 1 tok/s | batch 8 tok/s |")
    print("|---|---:|---:|")
    for name in engines:
        cells = []
        for batch in (1, 8):
            value = next((r["tok_s"] for r in rows if r["engine"] == name and r["batch"] == batch), None)
            cells.append(f"{value:.1f}" if value else "–")
        print(f"| {name} | {cells[0]} | {cells[1]} |")
    print()
    print("| ratio (same run) | value | target |")
    print("|---|---:|---:|")
    for r in result["ratios"]:
        mark = "met" if r["ratio"] >= r["target"] else "not met"
        print(f"| {r['ours']} / {r['peer']}, batch {r['batch']} | {r['ratio']:.2f}x | >= {r['target']:.1f}x ({mark}) |")
    print()
    bytes_ = summary["matrix_bytes"]
    print(f"weight matrices a token reads: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in bytes_.items())
          + f"; copy bandwidth {summary['copy_bandwidth_gb_s']:.1f} GB/s -> batch-1 ceilings "
          + ", ".join(f"{k} {summary['copy_bandwidth_gb_s'] * 1e9 / v:.0f} tok/s" for k, v in bytes_.items()))
    print(f"float32 greedy tokens equal llama.cpp f32's: {summary['float32_tokens_equal_llama_cpp_f32']}; "
          f"equal transformers': {summary['float32_tokens_equal_transformers']}")
    for note in summary["notes"]:
        print(f"note: {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer tokens (smoke run, noisier)")
    parser.add_argument("--scenarios", action="store_true",
                        help="tinyformer vs transformers: sampling, beam search, uncached contexts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=positive_int, default=3, help="passes through all engines (best is kept)")
    parser.add_argument("--repeats", type=positive_int, default=1, help="timed runs per cell in each round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: time one engine (benchmarks/isolated.py)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--new", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        report_worker({"rows": worker(args)})
        return 0
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.scenarios:
        from decode_scenarios import main as scenarios  # the older tinyformer-vs-transformers table

        return scenarios(argv=[a for a in (argv or sys.argv[1:]) if a != "--scenarios"])
    result = peers_table(args, log)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
