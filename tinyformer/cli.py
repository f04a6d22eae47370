"""The `tinyformer` command: train, generate, inspect, eval, export, convert, serve."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing

EPILOG = """examples:
  tinyformer train --preset tiny --time-budget 150 --out runs/demo
  tinyformer train --data ../shared/data/tinyshakespeare.txt --tokenizer char --preset tiny --out runs/shakespeare
  tinyformer generate runs/demo --prompt "The " --max-new-tokens 200
  tinyformer inspect runs/demo
run `tinyformer COMMAND --help` for each command's options."""


def _flag_type(field: dataclasses.Field):
    """The argparse type for a dataclass field (plain types, optionally `| None`)."""
    hint = field.type
    if isinstance(hint, str):
        hint = eval(hint, {"typing": typing})  # annotations are strings under `from __future__ import annotations`
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    return hint


def add_dataclass_flags(parser, cls, skip=(), group_title=None, help_texts=None, aliases=None, choices=None):
    """Every field of cls becomes --field-name; unset flags stay None so saved or preset values win."""
    group = parser.add_argument_group(group_title) if group_title else parser
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = _flag_type(field)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else None
        text = (help_texts or {}).get(field.name, "")
        text = f"{text} (default: {default})" if text else f"default: {default}"
        flags = [flag] + ([aliases[field.name]] if aliases and field.name in aliases else [])
        if kind is bool:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif choices and field.name in choices:
            group.add_argument(*flags, dest=field.name, choices=choices[field.name], default=None, help=text)
        else:
            group.add_argument(*flags, dest=field.name, type=kind, default=None, metavar=field.name.upper(),
                               help=text)


def add_precision_flags(parser, purpose: str = "run the model in this precision") -> None:
    from .model.quant import DTYPES, QUANTIZATIONS

    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help=f"{purpose}: cast the weights (default: as saved, usually float32)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                        help=f"{purpose}: int8 weight matrices, CPU only (default: as saved)")


def _given(args, cls, skip=()) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, f.name, None) is not None}


def _emit(args, data, text: str | None = None) -> None:
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=None if args.command == "generate" else 2))
    elif text is not None:
        print(text)


# ---------------------------------------------------------------- train
def cmd_train(args) -> int:
    from .checkpoint import read_config
    from .model import ModelConfig, preset
    from .train import PRESET_TRAINING, TrainConfig, check_same_architecture, process_rank, train

    model_overrides = _given(args, ModelConfig, skip=("vocab_size",))
    train_overrides = _given(args, TrainConfig)
    for key in ("data", "target_data"):
        if train_overrides.get(key) and os.path.exists(train_overrides[key]):
            train_overrides[key] = os.path.abspath(train_overrides[key])  # so --resume works from anywhere
    if args.resume:
        saved = read_config(args.out)
        model_config = ModelConfig.from_dict(saved["model"])
        if "architecture" in model_overrides:
            check_same_architecture(args.out, model_config.architecture, model_overrides["architecture"])
            model_overrides.pop("architecture")
        if model_overrides:
            raise ValueError(f"--resume continues the saved model; drop the model flags "
                             f"({', '.join('--' + k.replace('_', '-') for k in model_overrides)})")
        train_config = TrainConfig(**{**(saved.get("train") or {}), **train_overrides})
    else:
        name = args.preset or ("seq2seq" if model_overrides.get("architecture") == "seq2seq" else "tiny")
        model_config = preset(name, **model_overrides)
        train_config = TrainConfig(**{**PRESET_TRAINING.get(name, {}), **train_overrides})
    summary = train(model_config, train_config, args.out, resume=args.resume, overwrite=args.overwrite,
                    progress=not args.json and not args.quiet, log=(lambda *a, **k: None) if args.json else print)
    if process_rank()[0] != 0:
        return 0  # under torchrun only rank 0 speaks
    _emit(args, summary, None)
    if not args.json:
        print(f"checkpoint: {args.out}   val loss {summary.get('val_loss', float('nan')):.4f}   "
              f"bits/byte {summary.get('val_bpb', float('nan')):.4f}")
        print(f'next: tinyformer generate {args.out} --prompt "..."')
    return 0


def cmd_prepare(args) -> int:
    from .data import prepare

    header = prepare(args.data, args.tokenizer, args.out, val_fraction=args.val_fraction, workers=args.workers,
                     chunk_bytes=args.chunk_mb << 20, progress=not args.json and not args.quiet)
    _emit(args, header, f"{header['train_tokens']:,} train + {header['val_tokens']:,} held-out tokens "
                        f"({header['dtype']}) in {args.out}; next: tinyformer train --data {args.out} ...")
    return 0


def cmd_plot(args) -> int:
    from .train import plot_runs

    plot_runs(args.runs, args.out, x=args.x)
    print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    from .api import load
    from .generation import format_trace

    lm = load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as handle:
            prompts.append(handle.read())
    if args.prompt_ids:
        if prompts:
            raise ValueError("give text prompts (--prompt, --prompt-file) or --prompt-ids, not both")
        try:
            prompts = [[int(t) for t in ids.replace(",", " ").split()] for ids in args.prompt_ids]
        except ValueError:
            raise ValueError(f"--prompt-ids takes comma-separated integers, got {args.prompt_ids!r}") from None
    if not prompts:
        raise ValueError("give a prompt with --prompt TEXT (repeat it for a batch), --prompt-file FILE or "
                         "--prompt-ids 1,2,3")
    stops = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop or []]  # "\n" typed in a shell
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                   presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                   no_repeat_ngram_size=args.no_repeat_ngram_size, stop=stops, seed=args.seed,
                   num_beams=args.num_beams, length_penalty=args.length_penalty, early_stopping=args.early_stopping,
                   use_cache=not args.no_cache, window=args.window)
    if args.stream and not args.json and not args.trace:
        if len(prompts) > 1 or not isinstance(prompts[0], str):
            raise ValueError("--stream takes one text --prompt")
        sys.stdout.write(prompts[0])
        for delta in lm.generate(prompts[0], stream=True, **options):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    results = lm.generate(prompts, details=True, trace=args.trace, logprobs=args.logprobs, **options)
    if args.json:
        out = []
        for prompt, r in zip(prompts, results):
            item = {"prompt": prompt, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
            if r.logprobs is not None:
                item["logprobs"] = r.logprobs
            if r.top_logprobs is not None:
                item["top_logprobs"] = [[{"token": lm.tokenizer.token_text(t), "logprob": lp} for t, lp in alts]
                                        for alts in r.top_logprobs]
            if r.score is not None:
                item["score"] = r.score
                item["alternatives"] = [{"text": a.text, "score": a.score} for a in r.alternatives]
            if r.trace is not None:
                item["trace"] = [s.to_dict() for s in r.trace]
            out.append(item)
        print(json.dumps(out if len(out) > 1 else out[0], ensure_ascii=False))
        return 0
    for i, (prompt, r) in enumerate(zip(prompts, results)):
        if len(prompts) > 1:
            print(f"--- [{i}] ({r.finish_reason})")
        if r.trace is not None:
            print(format_trace(r.trace))
            print()
        if r.text is None:  # token-id prompt: ids out, and the text when there is a tokenizer
            print(" ".join(map(str, prompt + r.token_ids)))
            if lm.tokenizer is not None:
                print(lm.tokenizer.decode(prompt + r.token_ids))
        else:
            print(prompt + r.text)
        if r.score is not None:
            print(f"(score {r.score:.4f})")
            for alt in r.alternatives:
                print(f"  alt {alt.score:.4f}: {alt.text if alt.text is not None else alt.token_ids!r}")
        if r.logprobs is not None and not r.trace:
            pieces = [f"{lm.tokenizer.token_text(t)!r}:{lp:.3f}" for t, lp in zip(r.token_ids, r.logprobs)]
            print("logprobs: " + " ".join(pieces))
    return 0


# ---------------------------------------------------------------- inspect
def cmd_inspect(args) -> int:
    import torch

    from .api import load
    from .generation import kv_cache_bytes
    from .generation.cache import cross_cache_bytes
    from .model.quant import activation_dtype, cache_dtype, precision, weight_bytes

    lm = load(args.checkpoint, device="cpu", dtype=args.dtype, quantize=args.quantize)
    model = lm.model
    config = model.config
    total = model.num_parameters()
    modules = {}
    seen = set()
    for name, param in model.named_parameters():  # named_parameters skips the tied head: counted once
        if id(param) in seen:
            continue
        seen.add(id(param))
        in_stack = name.split(".")[0] in ("blocks", "encoder", "decoder")
        top = ".".join(name.split(".")[:2]) if in_stack else name.split(".")[0]
        modules[top] = modules.get(top, 0) + param.numel()
    state = {k: list(v.shape) for k, v in model.state_dict().items()}
    dtype = cache_dtype(model)  # what the caches hold
    length = args.cache_length or config.context_length
    weights = weight_bytes(model)
    cache = kv_cache_bytes(config, args.cache_batch, length, dtype)
    data = {"source": lm.source, "model": config.to_dict(), "parameters": total, "modules": modules,
            "precision": precision(model), "weight_bytes": weights,
            "tokenizer": getattr(lm.tokenizer, "spec", None), "state_dict": state,
            "kv_cache": {"batch": args.cache_batch, "length": length, "bytes": cache,
                         "formula": "2 x layers x kv_heads x head_dim x length x batch x bytes"},
            "train": lm.config.get("train"), "step": lm.config.get("step")}
    if lm.is_seq2seq:
        cross = cross_cache_bytes(config, args.cache_batch, length, activation_dtype(model))  # projected keys
        data["cross_attention_cache"] = {"sources": args.cache_batch, "source_length": length, "bytes": cross,
                                         "formula": "2 x decoder layers x kv_heads x head_dim x source length x "
                                                    "sources x bytes (shared by the beams of a source)"}
    lines = [f"source: {lm.source}", f"tokenizer: {data['tokenizer']} (vocab {config.vocab_size})", "config:"]
    lines += [f"  {k} = {v}" for k, v in config.to_dict().items()]
    lines += [f"parameters: {total:,}", f"precision: {precision(model)['dtype']}"
              + (f", {precision(model)['quantize']} matrices" if precision(model)["quantize"] else ""),
              f"weights: {weights:,} bytes ({weights / 2**20:.2f} MiB)", "per module:"]
    lines += [f"  {k:<16}{v:>14,}" for k, v in modules.items()]
    lines += [f"KV cache for batch {args.cache_batch} x {length} tokens ({str(dtype).replace('torch.', '')}): "
              f"{cache:,} bytes ({cache / 2**20:.2f} MiB) = 2 x {config.n_layers} layers x {config.kv_heads} kv heads"
              f" x {config.hidden_head_dim} head dim x {length} x {args.cache_batch} x "
              f"{torch.empty((), dtype=dtype).element_size()} bytes"]
    if lm.is_seq2seq:
        lines += [f"cross-attention cache for {args.cache_batch} source(s) x {length} tokens: {cross:,} bytes "
                  f"({cross / 2**20:.2f} MiB), computed once per source and shared by its beams"]
    lines += ["state_dict:"]
    lines += [f"  {k:<48}{tuple(v)}" for k, v in state.items()]
    _emit(args, data, "\n".join(lines))
    return 0


# ---------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    import math

    import torch
    import torch.nn.functional as F

    from .api import load
    from .data import load_text

    lm = load(args.checkpoint, device=args.device, dtype=args.dtype, quantize=args.quantize)
    if lm.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer to read text with")
    if lm.is_seq2seq:
        return _eval_translation(args, lm)
    text, description = load_text(args.data)
    ids = torch.tensor(lm.tokenizer.encode(text), dtype=torch.long)
    window = min(args.context_length or lm.model.config.context_length, lm.model.config.context_length)
    if len(ids) < 2:
        raise ValueError(f"{args.data} has fewer than 2 tokens")
    total, count = 0.0, 0
    device = lm.device
    with torch.inference_mode():
        for start in range(0, min(len(ids) - 1, args.max_tokens or len(ids)), window):  # non-overlapping windows
            chunk = ids[start:start + window + 1].to(device)
            if len(chunk) < 2:
                break
            logits = lm.model(chunk[None, :-1])
            total += F.cross_entropy(logits[0].float(), chunk[1:], reduction="sum").item()
            count += len(chunk) - 1
    loss = total / count
    scored_bytes = len(lm.tokenizer.decode(ids[1:count + 1].tolist()).encode("utf-8"))
    data = {"data": description, "tokens": count, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total / (scored_bytes * math.log(2))}
    _emit(args, data, f"{description}: {count:,} tokens  loss {loss:.4f}  perplexity {math.exp(loss):.2f}  "
                      f"bits/byte {data['bits_per_byte']:.4f}")
    return 0


def _eval_translation(args, lm) -> int:
    from .data import load_pairs
    from .evaluation import evaluate_translation

    if args.data is None:
        raise ValueError("a seq2seq model is scored on sentence pairs: give --data test.tsv (source<TAB>reference) "
                         "or --data SOURCES --target-data REFERENCES")
    for name in ("batch_size", "num_beams", "max_pairs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    pairs, description = load_pairs(args.data, args.target_data)
    if args.max_pairs:
        pairs = pairs[:args.max_pairs]
    result = evaluate_translation(lm, pairs, num_beams=args.num_beams, batch_size=args.batch_size,
                                  bleu_tokenize=args.bleu_tokenize, progress=not args.json)
    hypotheses = result.pop("hypotheses")
    if args.outputs:
        with open(args.outputs, "w", encoding="utf-8") as handle:
            handle.write("".join(h + "\n" for h in hypotheses))
    data = {"data": description, **result}
    _emit(args, data, f"{description}: {result['pairs']:,} pairs  loss {result['loss']:.4f}  "
                      f"BLEU {result['bleu']:.2f} ({result['bleu_tokenize']})  chrF {result['chrf']:.2f}  "
                      f"exact match {100 * result['exact_match']:.1f}%  "
                      f"({'greedy' if args.num_beams == 1 else f'beam {args.num_beams}'})")
    return 0


# ---------------------------------------------------------------- attention
def cmd_attention(args) -> int:
    from .api import load
    from .attention import attention_maps, plot_attention

    lm = load(args.checkpoint, device="cpu")
    if lm.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer to read the prompt with")
    maps = attention_maps(lm, args.prompt, args.max_new_tokens)
    path = plot_attention(maps, args.out, args.layer)
    _emit(args, {"out": str(path), "kind": maps.kind, "layers": len(maps.layers), "text": maps.text,
                 "queries": maps.queries, "keys": maps.keys},
          f"{maps.kind}-attention of {len(maps.layers)} layer(s) -> {path}\ngenerated: {maps.text!r}")
    return 0


# ---------------------------------------------------------------- export / convert
def cmd_export(args) -> int:
    from .api import load

    lm = load(args.checkpoint, device="cpu")
    if args.format == "gguf":
        from .interop.gguf import export_gguf

        notes = export_gguf(lm.model, lm.tokenizer, args.out, quantize=args.quantize or "f32")
        what = f"GGUF, {args.quantize or 'f32'}"
    else:
        from .interop.hf import export_hf

        if args.quantize:
            raise ValueError("--quantize is for --format gguf; Hugging Face export writes the model's own dtype")
        notes = export_hf(lm.model, lm.tokenizer, args.out, source_tokenizer=lm.source_tokenizer,
                          generation=lm.generation_defaults) or []
        what = "Hugging Face format"
    _emit(args, {"out_dir": args.out, "format": args.format, "quantize": args.quantize, "notes": list(notes)},
          "\n".join([f"exported {args.checkpoint} -> {args.out} ({what})", *notes]))
    return 0


def cmd_convert(args) -> int:
    from .interop import convert

    out = convert(args.source, args.out_dir, dtype=args.dtype, quantize=args.quantize)
    _emit(args, {"source": args.source, "out_dir": str(out)}, f"converted {args.source} -> {out}")
    return 0


# ---------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    try:
        import uvicorn

        from .server import API_KEY_ENV, Limits, create_app
    except ImportError as error:
        raise ValueError(f"serving needs FastAPI, uvicorn and prometheus-client ({error.name} is missing): "
                         "pip install 'tinyformer[serve]'") from None
    from .api import load

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-body-bytes", args.max_body_bytes)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    lm = load(args.checkpoint, device=args.device)
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as handle:
            template = handle.read()
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens, max_batch=args.max_batch,
                    max_queue=args.max_queue, max_body_bytes=args.max_body_bytes)
    app = create_app(lm, name=args.name, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                     limits=limits, chat_template=template)
    if not args.json:
        print(f"serving {lm.source} as {args.name or os.path.basename(os.path.normpath(lm.source))!r} on "
              f"http://{args.host}:{args.port}  (playground at /, OpenAI API under /v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.json else "info")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .model import PRESETS, ModelConfig
    from .model.config import ARCHITECTURES
    from .train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="tinyformer", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Train Transformer language models from scratch, generate fast, look inside, interoperate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, help_text, **kw):
        p = sub.add_parser(name, help=help_text, description=help_text, **kw)
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")
        return p

    p = command("train", "train a GPT from scratch on text (default: the Python docs that ship with Python)")
    p.add_argument("--preset", default=None, help=f"model preset: {', '.join(PRESETS)} (default: tiny, or seq2seq "
                   "with --arch seq2seq); it also sets lr, batch size, warmup, optimizer and schedule unless "
                   "given (tinyformer.train.PRESET_TRAINING)")
    p.add_argument("--out", default="runs/default", help="checkpoint directory (default: runs/default)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_flags(p, ModelConfig, skip=("vocab_size",), group_title="model (override the preset)",
                        aliases={"architecture": "--arch"}, choices={"architecture": ARCHITECTURES})
    add_dataclass_flags(p, TrainConfig, group_title="training")
    p.set_defaults(func=cmd_train)

    p = command("prepare", "tokenize a large text file once, in parallel, into memory-mapped train.bin/val.bin")
    p.add_argument("--data", required=True, help="one UTF-8 text file")
    p.add_argument("--tokenizer", default="char", help="char | bpe:N | cl100k_base (default: char)")
    p.add_argument("--out", required=True, help="directory to write (then: tinyformer train --data DIR)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the file (default: 0.1)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--chunk-mb", type=int, default=4, help="MiB of text per task (default: 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = command("plot", "overlay the val-loss curves of training runs (their metrics.jsonl) in one PNG")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    p.add_argument("--x", default="step", choices=("step", "tokens", "elapsed"), help="x axis (default: step)")
    p.set_defaults(func=cmd_plot)

    p = command("generate", "generate text from a checkpoint, a Hugging Face directory or a tutorial .ckpt")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompt-file", help="read the prompt from a file")
    p.add_argument("--prompt-ids", action="append", metavar="IDS",
                   help="a prompt as token ids, e.g. 464,2068 (for models without a tokenizer); repeatable")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop string (\\n and \\t mean newline and tab); repeatable")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--early-stopping", action="store_true")
    p.add_argument("--logprobs", type=int, default=None, metavar="N", help="show token logprobs and N alternatives")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--trace", action="store_true", help="table of each step's top-5 candidates")
    p.add_argument("--no-cache", action="store_true", help="recompute every step (slow; for checking)")
    p.add_argument("--window", default="auto", choices=("auto", "roll", "recompute"),
                   help="past the context: roll the cache (RoPE) or recompute the last context_length tokens")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_precision_flags(p)
    p.set_defaults(func=cmd_generate)

    p = command("inspect", "show config, parameter counts, weight names and shapes, KV-cache size")
    p.add_argument("checkpoint")
    p.add_argument("--cache-batch", type=int, default=1, help="batch size for the KV-cache size (default 1)")
    p.add_argument("--cache-length", type=int, default=None, help="tokens for the KV-cache size (default: context)")
    add_precision_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = command("eval", "loss, perplexity and bits per byte of a model on text")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="text file, directory or glob (default: the Python docs)")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--device", default="auto")
    add_precision_flags(p)
    s2s = p.add_argument_group("seq2seq models (--data is a TSV of source<TAB>reference pairs)")
    s2s.add_argument("--target-data", default=None, help="references as a file aligned with --data")
    s2s.add_argument("--num-beams", type=int, default=1, help="decode with beam search (default: greedy)")
    s2s.add_argument("--batch-size", type=int, default=64, help="sources decoded at once (default 64)")
    s2s.add_argument("--bleu-tokenize", default=None, choices=("13a", "zh", "intl", "char", "none"),
                     help="sacrebleu tokenizer (default: zh for Chinese/Japanese references, else 13a)")
    s2s.add_argument("--max-pairs", type=int, default=None, help="score only the first N pairs")
    s2s.add_argument("--outputs", default=None, help="write the translations here, one per line")
    p.set_defaults(func=cmd_eval)

    p = command("attention", "draw attention heat maps of one generation (cross-attention for seq2seq)")
    p.add_argument("checkpoint")
    p.add_argument("--prompt", required=True, help="the prompt (the source sentence for seq2seq)")
    p.add_argument("--out", default="attention.png", help="PNG to write (default: attention.png)")
    p.add_argument("--layer", type=int, default=None, help="draw only this layer (0-based; default: all)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(func=cmd_attention)

    p = command("export", "export a model to another format: Hugging Face (config.json + model.safetensors) or "
                          "GGUF (one file for llama.cpp, ollama, LM Studio)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="output directory (hf) or file (gguf)")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"))
    p.add_argument("--quantize", default=None, choices=("f32", "f16", "q8_0"),
                   help="GGUF weight matrices' type (default: f32)")
    p.set_defaults(func=cmd_export)

    p = command("convert", "convert a tutorial .ckpt or a Hugging Face directory to a tinyformer checkpoint")
    p.add_argument("source")
    p.add_argument("out_dir")
    add_precision_flags(p, "store the weights in this precision (quantize once, load fast)")
    p.set_defaults(func=cmd_convert)

    p = command("serve", "serve a model over an OpenAI-compatible HTTP API, with a playground at /")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="the model id clients send (default: the checkpoint's name)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 and the tokenizer "
                   "routes (default: $TINYFORMER_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting to join; more get 429 (default 64)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens (default: the context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template (default: the model's own, else 'Role: content' lines)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("tinyformer: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as error:
        if os.environ.get("TINYFORMER_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"tinyformer {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
