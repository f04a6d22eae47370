"""Training: next-token cross-entropy with teacher forcing, AdamW or Muon, warmup + cosine or warmup-stable-decay,
evals, checkpoints, exact resume.

One loop trains both architectures: a GPT on random windows of text (TokenData), a seq2seq model on length-bucketed
batches of sentence pairs (PairData: the decoder reads <bos> + target, is scored on target + <eos>, padding ignored).

`train(model_config, train_config, out_dir)` writes into out_dir: the checkpoint (config.json, model.safetensors,
tokenizer files, trainer_state.pt), metrics.jsonl (one JSON object per log/eval) and loss.png.

Step counting: `step` is the number of optimizer updates done; step k's update uses lr_at(k - 1). Evaluation happens
before the first update (step 0), every eval_interval steps and at the end; each eval saves a checkpoint.

Stopping: at the schedule horizon (max_steps; estimated from the measured speed when only time_budget is given;
DEFAULT_MAX_STEPS when neither is), when the time budget is spent, after step stop_at, or on Ctrl-C. The time budget
counts the training loop's wall-clock (steps, evals, checkpoints) summed over resumed sessions, not data preparation.

Determinism: on CPU the same config and seed give bit-identical runs, and an interrupted run resumed with
resume=True continues exactly as if it had never stopped (same losses, bit-identical weights). On CUDA runs are
reproducible only as far as its kernels are.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import (CheckpointError, load_checkpoint, load_source_tokenizer, load_trainer_state, read_config,
                         save_checkpoint)
from .data import PairData, TokenData, is_prepared, load_pairs, load_prepared, load_text
from .model import ModelConfig, build_model, preset
from .optim import Muon, Optimizers
from .tokenizers import get_tokenizer

DEFAULT_MAX_STEPS = 2000  # the horizon when neither max_steps nor time_budget is given
# A time budget becomes a schedule horizon by timing the steps after a warm-up one: at least MEASURE_STEPS of them
# over MEASURE_FRACTION of the remaining budget (single steps vary by ~10%: 5 steps misjudged a 50 s horizon by 20%),
# or over the whole stable phase when the schedule holds lr before a cooldown (the horizon matters only from there).
MEASURE_STEPS = 5
MEASURE_FRACTION = 0.05
# Fields that may differ between an interrupted run and its resumption without changing the training trajectory.
SESSION_FIELDS = ("stop_at", "device", "log_interval", "eval_interval", "eval_iters", "save_interval", "keep_last",
                  "compile")
DTYPES = ("float32", "bfloat16")
DECAYS = ("cosine", "linear")
OPTIMIZERS = ("adamw", "muon")
LOCK_FILE = ".lock"  # flock'ed for the whole run so a second writer on the same out_dir is refused


# Training settings that suit each model preset (used by the CLI when a flag is not given). `tiny`: measured on
# nanoGPT's CPU recipe (tinyshakespeare char, tiny's shape with context 64; benchmarks/train_speed.py, 2 cores, val
# loss over 20 fixed batches). Muon for the hidden matrices at lr 1e-2 with warmup-stable-decay (linear to 0 over
# the last 60%) reached 1.838 in a 50 s budget and 1.691 in 100 s (the README's benchmark run: 1.837, 1.700); the
# previous AdamW lr 5e-3 with warmup + cosine reached 1.97 and 1.80 (nanoGPT: 1.886 in 104 s). Muon's update costs
# ~25 ms a step here, so batch 16 (1.842 at 50 s) beat 12 (1.925), 24 (1.860) and 48 (1.917); lr 1.5e-2 (1.856)
# and 5e-3 (1.871 at batch 24) did no better, and decaying over the last 40% ended 0.02 higher at 100 s. Single
# runs vary by ~0.02, and the batch 12/24 runs had a horizon misjudged by up to 20% (before the stable phase was
# timed), so only the large gaps are meaningful.
PRESET_TRAINING = {
    "tiny": dict(lr=1e-2, batch_size=16, warmup_steps=30, optimizer="muon", decay="linear", min_lr=0.0,
                 cooldown=0.6),
    "llama-tiny": dict(lr=3e-3, batch_size=16, warmup_steps=30),
    "gpt2": dict(lr=6e-4, batch_size=8, warmup_steps=200),
    "seq2seq": dict(lr=2e-3, batch_tokens=1024, warmup_steps=100, label_smoothing=0.1),
    "marian": dict(lr=3e-4, batch_tokens=4096, warmup_steps=1000, label_smoothing=0.1),
}


class TrainError(ValueError):
    """A training setting or situation that cannot proceed; the message names the value and what is allowed."""


@dataclass
class TrainConfig:
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float | None = None  # where the decay ends; None means lr / 10
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear: the shape of the decay from lr to min_lr
    cooldown: float = 1.0  # fraction of the steps after warmup spent decaying; before it lr holds (1: decay all along)
    max_steps: int | None = None  # schedule horizon; None: estimated from time_budget, else DEFAULT_MAX_STEPS
    time_budget: float | None = None  # seconds of training loop
    optimizer: str = "adamw"  # adamw | muon: Muon for the hidden weight matrices, AdamW for the rest
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_interval: int = 250
    eval_iters: int = 20
    val_fraction: float = 0.1
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_interval: int = 10
    stop_at: int | None = None  # stop (and checkpoint) after this step, keeping the schedule horizon
    save_interval: int | None = None  # also checkpoint every N steps (None: only at evals and the end)
    grad_accum: int = 1  # micro-batches summed into each optimizer step (batch_size is per micro-batch and process)
    dtype: str = "float32"  # float32 | bfloat16 (autocast for the forward pass; weights and optimizer stay float32)
    compile: bool = False  # torch.compile the model
    keep_last: int = 0  # keep copies of the last K step checkpoints in out/checkpoints/step-NNNNNN/ (0: none)
    tokenizer: str = "char"  # char | bpe:N | cl100k_base
    data: str | None = None  # file, directory of .txt, glob; None: Python's reference docs. seq2seq: a TSV of pairs
    # seq2seq only
    target_data: str | None = None  # the target side as a file aligned line by line with `data` (instead of a TSV)
    source_tokenizer: str | None = None  # a separate source tokenizer (separate embeddings); None: share `tokenizer`
    batch_tokens: int = 4096  # tokens per batch a side, padding included (sentences of similar length are batched)
    label_smoothing: float = 0.0

    def __post_init__(self):
        self.validate()

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise TrainError(msg)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.decay in DECAYS, f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        need(is_num(self.cooldown) and 0 < self.cooldown <= 1,
             f"cooldown must be a fraction in (0, 1], got {self.cooldown!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(isinstance(self.compile, bool), f"compile must be true or false, got {self.compile!r}")
        for name in ("batch_size", "eval_interval", "eval_iters", "log_interval", "batch_tokens", "grad_accum"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, f"{name} must be a positive integer, got {v!r}")
        need(is_int(self.keep_last) and self.keep_last >= 0,
             f"keep_last must be a non-negative integer, got {self.keep_last!r}")
        for name in ("max_steps", "stop_at", "save_interval"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v > 0), f"{name} must be a positive integer or None, got {v!r}")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        need(is_int(self.seed) and 0 <= self.seed < 2**63, f"seed must be a non-negative integer, got {self.seed!r}")
        need(is_num(self.lr) and self.lr > 0, f"lr must be a positive number, got {self.lr!r}")
        need(self.min_lr is None or (is_num(self.min_lr) and 0 <= self.min_lr <= self.lr),
             f"min_lr must be a number in [0, lr={self.lr!r}] or None, got {self.min_lr!r}")
        need(self.time_budget is None or (is_num(self.time_budget) and self.time_budget > 0),
             f"time_budget must be a positive number of seconds or None, got {self.time_budget!r}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            need(is_num(v) and v >= 0, f"{name} must be a non-negative number, got {v!r}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            need(is_num(v) and 0 <= v < 1, f"{name} must be a number in [0, 1), got {v!r}")
        need(is_num(self.val_fraction) and 0 < self.val_fraction < 0.5,
             f"val_fraction must be a number in (0, 0.5), got {self.val_fraction!r}")
        need(isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(isinstance(self.tokenizer, str) and self.tokenizer != "",
             f"tokenizer must be a spec like char, bpe:2048 or cl100k_base, got {self.tokenizer!r}")
        need(self.data is None or (isinstance(self.data, str) and self.data != ""),
             f"data must be a path, a glob or None, got {self.data!r}")
        need(is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1,
             f"label_smoothing must be a number in [0, 1), got {self.label_smoothing!r}")
        need(self.source_tokenizer is None or (isinstance(self.source_tokenizer, str) and self.source_tokenizer),
             f"source_tokenizer must be a spec like char or bpe:2048, or None, got {self.source_tokenizer!r}")


def lr_at(step: int, config: TrainConfig, horizon: int | None) -> float:
    """Linear warmup to lr; then lr held until the last `cooldown` fraction of the steps up to `horizon`, which decay
    it (cosine or linear) to final_lr at `horizon` (held there after; peak while the horizon is unknown).
    cooldown 1 is the classic warmup + cosine; a cooldown < 1 with a linear decay is the warmup-stable-decay
    ("trapezoidal") schedule of the modded-nanogpt speedrun."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if horizon is None:
        return config.lr
    decay_steps = max(1.0, config.cooldown * (horizon - config.warmup_steps))
    progress = min(1.0, max(0.0, (step - (horizon - decay_steps)) / decay_steps))
    remaining = 0.5 * (1 + math.cos(math.pi * progress)) if config.decay == "cosine" else 1 - progress
    return config.final_lr + remaining * (config.lr - config.final_lr)


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device):
    """AdamW that decays only the 2-D weights of Linear layers: not norms, biases or embeddings. With
    config.optimizer "muon", the hidden Linear weights (all but the output head) go to Muon instead, with the same lr
    and weight decay (Moonshot's RMS matching makes AdamW's carry over), and AdamW keeps the rest.

    A tied LM head is the embedding's tensor, so it counts once (named_parameters deduplicates) and is not decayed.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embeddings
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    hidden = set()
    if config.optimizer == "muon":
        head = getattr(model, "lm_head", None)
        hidden = linear - {id(head.weight) if head is not None else None}
    groups = [{"params": [p for p in params if id(p) in linear - hidden], "weight_decay": config.weight_decay},
              {"params": [p for p in params if id(p) not in linear], "weight_decay": 0.0}]
    # The fused kernel (CUDA, and CPU since torch 2.4) updates every tensor in one pass; elsewhere the default.
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                              fused=True if device.type in ("cuda", "cpu") else None)
    if not hidden:
        return adamw
    muon = Muon([p for p in params if id(p) in hidden], lr=config.lr, weight_decay=config.weight_decay,
                adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
            reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy, averaged over every position whose target is not -100 (the ignore index: padding;
    never the pad id, which may be eos)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction=reduction)


def draw_batch(data, split: str, batch_size: int, context_length: int, generator: torch.Generator, device):
    """(model inputs, targets) on device: a GPT's random windows, or a bucket of sentence pairs."""
    if isinstance(data, PairData):
        inputs, targets = data.batch(split, generator)
    else:
        x, targets = data.batch(split, batch_size, context_length, generator)
        inputs = {"input_ids": x}
    return {k: v.to(device) for k, v in inputs.items()}, targets.to(device)


def draw_step(data, cfg: TrainConfig, context_length: int, generator: torch.Generator, device, rank: int = 0,
              world: int = 1) -> tuple[list, int]:
    """One optimizer step's data for this process: (grad_accum micro-batches of (inputs, targets), the number of
    scored target tokens in the whole global batch).

    Every process draws the same global batch from the run's generator and keeps its own share, so the data a run
    sees depends only on the seed and the global batch (world x grad_accum x batch_size windows, or buckets of
    pairs), never on which process drew what, and resuming needs only the one generator state."""
    micro, parts = cfg.grad_accum, world * cfg.grad_accum
    if isinstance(data, PairData):
        buckets = [data.bucket("train", i) for i in data.draw_buckets("train", parts, generator)]
        total = sum(data.scored_tokens(items) for items in buckets)
        mine = [data.collate(items) for items in buckets[rank * micro:(rank + 1) * micro]]
    else:
        B = cfg.batch_size
        x, y = data.batch("train", parts * B, context_length, generator, rows=slice(rank * micro * B,
                                                                                  (rank + 1) * micro * B))
        total = parts * B * context_length
        mine = [({"input_ids": x[i * B:(i + 1) * B]}, y[i * B:(i + 1) * B]) for i in range(micro)]
    return [({k: v.to(device) for k, v in inputs.items()}, targets.to(device)) for inputs, targets in mine], total


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int, iters: int, seed: int, device) -> float:
    """Mean held-out loss (eval mode: no dropout draws; the training RNGs are never touched). Text: `iters`
    batches from a generator seeded afresh, so every eval sees the same windows. Pairs: every held-out pair,
    averaged per target token."""
    was_training = model.training
    model.eval()
    if isinstance(data, PairData):
        total = count = 0
        for inputs, targets in data.all_batches("val"):
            inputs = {k: v.to(device) for k, v in inputs.items()}
            total += lm_loss(model(**inputs), targets.to(device), reduction="sum").item()
            count += int((targets != -100).sum())
        result = total / count
    else:
        generator = torch.Generator().manual_seed(seed + 1)
        result = 0.0
        for _ in range(iters):
            inputs, targets = draw_batch(data, "val", batch_size, model.config.context_length, generator, device)
            result += lm_loss(model(**inputs), targets).item() / iters
    model.train(was_training)
    return result


def resume_configs(out_dir) -> tuple[ModelConfig, TrainConfig]:
    """The model and train configs a checkpoint directory was trained with (for a CLI to merge flags into)."""
    config = read_config(out_dir)
    if not isinstance(config.get("train"), dict):
        raise TrainError(f"{out_dir} holds a checkpoint without a train config; it cannot be resumed")
    return ModelConfig.from_dict(config["model"]), TrainConfig(**config["train"])


def train(model_config: ModelConfig | str | None, train_config: TrainConfig | None, out_dir, resume: bool = False,
          progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Train a GPT and checkpoint it into out_dir; return a summary dict (see the end of this function).

    model_config may be a preset name. With resume=True the checkpoint's configs win: pass None to take them as
    saved, or configs that match them (only SESSION_FIELDS of the train config may differ; vocab_size is ignored;
    a stop_at the checkpoint already reached is dropped, so passing the saved train config back continues).
    Without resume, an existing checkpoint in out_dir is an error unless overwrite=True. `log` receives one-line
    messages (None silences them); `progress` shows a tqdm bar.
    """
    out = Path(out_dir)
    if isinstance(model_config, str):
        model_config = preset(model_config)
    if out.exists() and not out.is_dir():
        raise TrainError(f"out_dir {out} is a file, not a directory")
    if resume:
        if not (out / "config.json").is_file():
            raise TrainError(f"cannot resume: out_dir {out} holds no checkpoint (no config.json)")
    else:
        if model_config is None:
            raise TrainError("a new run needs a model config (a ModelConfig or a preset name)")
        train_config = train_config or TrainConfig()
        train_config.validate()  # again: a dataclass can be edited after construction
        _device(train_config.device)
        existing = _existing_step(out)
        if existing is not None and not overwrite:
            raise TrainError(f"out_dir {out} already holds a checkpoint (step {existing}); "
                             f"pass --resume to continue or choose another --out")
    rank, world = process_rank()
    # Only rank 0 writes, so only it locks; the lock is taken before a resumed state is read so it cannot change.
    with lock_out_dir(out) if rank == 0 else nullcontext(), _process_group(world, train_config):
        return _run(model_config, train_config, out, resume, progress and rank == 0, log if rank == 0 else None)


def _run(model_config, train_config, out: Path, resume: bool, progress: bool, log) -> dict:
    state = None
    if resume:
        model_config, cfg, model, tokenizer, source_tokenizer, state = _load_for_resume(out, model_config,
                                                                                          train_config)
        if cfg.stop_at is not None and cfg.stop_at <= state["step"]:  # the stop that ended the previous session
            cfg = replace(cfg, stop_at=None)
    else:
        cfg = train_config
    if is_prepared(cfg.data):  # token files from `tinyformer prepare`, memory-mapped: the tokenizer comes with them
        if model_config.architecture == "seq2seq":
            raise TrainError(f"{cfg.data} is a prepared text corpus; seq2seq trains on sentence pairs (a TSV)")
        data, prepared_tokenizer, header = load_prepared(cfg.data, model_config.context_length)
        data_sha = _sha256(json.dumps(header, sort_keys=True))
        description = f"{header['train_tokens'] + header['val_tokens']:,} tokens prepared in {cfg.data}"
        if state is None:
            tokenizer, source_tokenizer = prepared_tokenizer, None
            model_config = model_config.replace(vocab_size=tokenizer.vocab_size)
    else:
        text, pairs, description = _load_data(model_config, cfg)
        data_sha = _sha256(text)
        if state is None:
            tokenizer, source_tokenizer, model_config = _make_tokenizers(model_config, cfg, text, pairs)
        if pairs is not None:
            data = PairData.from_pairs(pairs, tokenizer, source_tokenizer, cfg.val_fraction,
                                       model_config.context_length, cfg.batch_tokens)
        else:
            data = TokenData.from_text(text, tokenizer, cfg.val_fraction, model_config.context_length)
    if state is not None and data_sha != state.get("data_sha256"):
        raise TrainError(f"data {cfg.data or 'pydoc'} changed since the checkpoint in {out} was written; "
                         f"resuming would train on different text")
    device = _device(cfg.device)

    # Fork the RNGs so training (seeding, dropout) leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if device.type == "cuda" else []):
        if state is None:
            torch.manual_seed(cfg.seed)  # the initial weights, then dropout, draw from the global RNG
            model = build_model(model_config)
        return _train_loop(model, tokenizer, source_tokenizer, data, cfg, device, out, state, data_sha, description,
                           progress, log)


@contextmanager
def lock_out_dir(out: Path):
    """Hold an exclusive OS lock (flock) on out/.lock for the duration: a second writer gets one clear error.
    The kernel drops the lock when the process dies, so a crashed run never leaves a stale lock behind."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+b")
    failed = True
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): run unlocked rather than not at all
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TrainError(f"out_dir {out} is in use: another training process holds {out / LOCK_FILE}; "
                                 f"wait for it to finish (or stop it) or choose another --out") from None
        yield
        failed = False
    finally:
        handle.close()
        if failed and created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(out)  # bad input leaves no trace: only the lock was written


def _load_data(model_config: ModelConfig, cfg: TrainConfig):
    """-> (all the text, for the data hash and tokenizer training; pairs or None; description)."""
    if model_config.architecture == "seq2seq":
        if cfg.data is None:
            raise TrainError("a seq2seq model trains on sentence pairs: give --data pairs.tsv "
                             "(source<TAB>target per line) or --data SOURCE --target-data TARGET")
        pairs, description = load_pairs(cfg.data, cfg.target_data)
        return "\n".join(f"{s}\t{t}" for s, t in pairs), pairs, description
    if cfg.target_data is not None or cfg.source_tokenizer is not None:
        raise TrainError("--target-data and --source-tokenizer are for seq2seq models (--arch seq2seq)")
    text, description = load_text(cfg.data)
    return text, None, description


def _make_tokenizers(model_config: ModelConfig, cfg: TrainConfig, text: str, pairs):
    """-> (tokenizer, source tokenizer or None, model config with the vocabulary sizes)."""
    if pairs is None:
        tokenizer = get_tokenizer(cfg.tokenizer, text)
        return tokenizer, None, model_config.replace(vocab_size=tokenizer.vocab_size)
    if cfg.source_tokenizer is None:  # one vocabulary for both sides, learnt from both
        tokenizer = get_tokenizer(cfg.tokenizer, text)
        return tokenizer, None, model_config.replace(vocab_size=tokenizer.vocab_size, share_embeddings=True,
                                                     src_vocab_size=None)
    tokenizer = get_tokenizer(cfg.tokenizer, "\n".join(t for _, t in pairs))
    source_tokenizer = get_tokenizer(cfg.source_tokenizer, "\n".join(s for s, _ in pairs))
    return tokenizer, source_tokenizer, model_config.replace(
        vocab_size=tokenizer.vocab_size, share_embeddings=False, src_vocab_size=source_tokenizer.vocab_size)


def _train_loop(model, tokenizer, source_tokenizer, data, cfg, device, out, state, data_sha, description, progress,
                log) -> dict:
    from tqdm.auto import tqdm

    say = tqdm.write if log is print else log or (lambda message: None)  # tqdm.write keeps the bar intact
    rank, world = process_rank()
    main = rank == 0  # only rank 0 evaluates, writes and prints; every rank steps the same weights
    ctx, vocab = model.config.context_length, model.config.vocab_size
    raw_model = model.to(device).train()  # the module itself: saved, evaluated, optimized
    optimizer = make_optimizer(raw_model, cfg, device)
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    data_rng = torch.Generator().manual_seed(cfg.seed)  # batches draw from their own generator, not the global one
    step, history, elapsed_before, tokens_seen = 0, [], 0.0, 0
    horizon = cfg.max_steps or (None if cfg.time_budget else DEFAULT_MAX_STEPS)
    loss_sum, loss_count = torch.zeros((), device=device), 0  # train loss summed over the current log interval
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        data_rng.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step, history, elapsed_before, horizon = state["step"], state["history"], state["elapsed"], state["max_steps"]
        tokens_seen = state.get("tokens_seen", 0)
        loss_sum.fill_(state["loss_sum"])
        loss_count = state["loss_count"]
    if world > 1:  # dropout: each process its own masks (seeded by run, rank and the step this session starts at)
        torch.manual_seed(cfg.seed + 1_000_003 * rank + 7919 * step)

    metrics_path = out / "metrics.jsonl"
    if main:  # rewrite from the checkpoint's history: a resumed run drops lines logged after its last checkpoint
        out.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")

    start = time.perf_counter()
    paused = paused_total = 0.0  # seconds spent evaluating and saving: not training throughput
    interval_start = start
    session_steps, session_tokens = 0, 0
    measure_start = measure_budget = 0.0  # timing the steps that turn a time budget into a schedule horizon
    tokens_done = 0  # training tokens scored since the last log

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def write(record: dict) -> dict:
        record = {"step": step, "tokens": tokens_seen, "lr": lr_at(max(step - 1, 0), cfg, horizon),
                  "train_loss": None, "val_loss": None, "val_bpb": None, "tokens_per_s": None,
                  "elapsed": round(elapsed(), 3), **peak_memory(device), **record}
        history.append(record)
        if main:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def train_record() -> dict:
        nonlocal interval_start, paused, tokens_done
        now = time.perf_counter()
        train_seconds = max(now - interval_start - paused, 1e-9)
        interval_start, paused = now, 0.0
        tokens, tokens_done = tokens_done, 0
        total = loss_sum.clone()
        if world > 1:  # the mean over every process's share of the global batch
            torch.distributed.all_reduce(total)
            total /= world
        return {"train_loss": total.item() / loss_count, "tokens_per_s": tokens / train_seconds}

    def eval_record() -> dict:
        val_loss = evaluate(raw_model, data, cfg.batch_size, cfg.eval_iters, cfg.seed, device)
        if not math.isfinite(val_loss):
            raise_non_finite(f"validation loss is {val_loss}")
        return {"val_loss": val_loss, "val_bpb": data.bits_per_byte(val_loss)}

    def raise_non_finite(what: str):
        last = _existing_step(out)
        raise TrainError(f"training diverged at step {step}: {what} (lr {lr_at(max(step - 1, 0), cfg, horizon):.3g});"
                         f" the last good checkpoint (step {last}) in {out} is kept; lower --lr or raise "
                         f"--warmup-steps, then train again or resume it")

    def save() -> None:
        if not main:
            return
        if not all(torch.isfinite(p).all() for p in raw_model.parameters()):  # never overwrite good weights
            raise_non_finite("the weights hold NaN or inf")
        trainer_state = {
            "optimizer": optimizer.state_dict(), "data_rng": data_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "max_steps": horizon, "history": history, "elapsed": elapsed(), "loss_sum": loss_sum.item(),
            "loss_count": loss_count, "data_sha256": data_sha, "tokens_seen": tokens_seen}
        last_val = next((r for r in reversed(history) if r["val_loss"] is not None), {})
        save_checkpoint(out, raw_model, tokenizer, train_config=asdict(cfg), trainer_state=trainer_state, step=step,
                        extra={"data": description, "metrics": {"val_loss": last_val.get("val_loss"),
                                                                 "val_bpb": last_val.get("val_bpb")}},
                        source_tokenizer=source_tokenizer)
        if cfg.keep_last:
            keep_step_copy(out, step, cfg.keep_last)
        plot_losses(history, out / "loss.png")

    def timed(action) -> None:
        nonlocal paused, paused_total
        t0 = time.perf_counter()
        action()
        paused += time.perf_counter() - t0
        paused_total += time.perf_counter() - t0

    def eval_and_save(record: dict) -> None:
        if not main:
            return

        def run():
            written = write({**record, **eval_record()})
            save()
            say(f"step {step}: val loss {written['val_loss']:.4f} ({written['val_bpb']:.3f} bits/byte)"
                + (f", train loss {written['train_loss']:.4f}" if written["train_loss"] is not None else ""))
        timed(run)

    if isinstance(data, PairData):
        size = f"{len(data.pairs['train']):,} train / {len(data.pairs['val']):,} held-out pairs"
    else:
        size = f"{len(data.train):,} train / {len(data.val):,} held-out tokens"
    say(f"training {raw_model.num_parameters():,} parameters ({raw_model.config.architecture}) on {device}"
        + (f" x {world} processes" if world > 1 else "") + f" from {description}: {size} ({tokenizer.spec}, "
        f"vocab {vocab}) -> {out}")
    if state is None:
        eval_and_save({})  # step 0: the untrained model's loss, about ln(vocab)
    bar = tqdm(total=horizon, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    stopped = None
    with _deferred_interrupt() as interrupt:
        while stopped is None:
            if horizon is not None and step >= horizon:
                stopped = "max_steps"
            elif cfg.time_budget is not None and main and elapsed() >= cfg.time_budget:
                stopped = "time_budget"
            elif cfg.stop_at is not None and step >= cfg.stop_at:
                stopped = "stop_at"
            elif interrupt.is_set():
                stopped = "interrupt"
            if world > 1:  # every process stops at the same step, on rank 0's clock and horizon
                stopped, horizon = _agree(stopped, horizon if main else None, device)
            if stopped:
                break

            lr = lr_at(step, cfg, horizon)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, global_tokens = draw_step(data, cfg, ctx, data_rng, device, rank, world)
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for i, (inputs, targets) in enumerate(micro_batches):
                # Each micro-batch's summed loss over the global batch's token count, times world because DDP
                # averages gradients over processes: the gradient is that of the global batch's mean loss.
                sync = i == len(micro_batches) - 1 or world == 1
                with nullcontext() if sync else model.no_sync():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
                        # teacher forcing: every position predicts its next token in parallel
                        loss = lm_loss(model(**inputs), targets, cfg.label_smoothing, reduction="sum") \
                            * (world / global_tokens)
                    loss.backward()
                step_loss += loss.detach()
            norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
            if not torch.isfinite(norm):  # the same on every process: gradients are all-reduced
                bar.close()
                raise_non_finite(f"the loss or its gradient is not finite (train loss {step_loss.item():.4g})")
            optimizer.step()
            step += 1
            session_steps += 1
            tokens_seen += global_tokens
            tokens_done += global_tokens
            session_tokens += global_tokens
            loss_sum += step_loss
            loss_count += 1
            bar.update(1)

            # A time budget without max_steps: time the steps after a warm-up one (evals and saves included), then
            # fix the horizon so the decay ends when the budget does.
            if horizon is None and main and session_steps == 1:
                measure_start = time.perf_counter()
                measure_budget = max(MEASURE_FRACTION, 1 - cfg.cooldown) * (cfg.time_budget - elapsed())
            elif (horizon is None and main and session_steps > MEASURE_STEPS
                  and time.perf_counter() - measure_start >= measure_budget):
                per_step = (time.perf_counter() - measure_start) / (session_steps - 1)
                if session_steps - 1 < cfg.eval_interval:  # no eval timed: assume eval_iters forward passes, ~1/2 step
                    per_step *= 1 + cfg.eval_iters / (2 * cfg.eval_interval)
                horizon = step + max(1, int((cfg.time_budget - elapsed()) / per_step))
                bar.total = horizon
                bar.refresh()
                say(f"time budget {cfg.time_budget:g}s at {per_step * 1e3:.1f} ms/step: schedule horizon {horizon} "
                    f"steps")

            record = {}
            if step % cfg.log_interval == 0:
                record = train_record()
                loss_sum.zero_()
                loss_count = 0
                bar.set_postfix(loss=f"{record['train_loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                lr=f"{lr:.2e}", refresh=False)
                if not progress:
                    say(f"step {step}/{horizon or '?'}: loss {record['train_loss']:.4f}, lr {lr:.2e}, "
                        f"{record['tokens_per_s']:,.0f} tok/s")
            if step % cfg.eval_interval == 0:
                eval_and_save(record)
            else:
                if record:
                    write(record)
                if cfg.save_interval and step % cfg.save_interval == 0:
                    timed(save)

        # The end: log the partial interval (keeping its sums in the checkpoint so a resumed run continues them),
        # evaluate unless an interrupt asked for a quick exit or this step was just evaluated, and checkpoint.
        record = train_record() if loss_count else {}
        last = history[-1] if history else {}
        if stopped == "interrupt" or (last.get("step") == step and last.get("val_loss") is not None):
            if record:
                write(record)
            save()
        else:
            eval_and_save(record)
    bar.close()
    if world > 1:
        torch.distributed.barrier()  # the others wait for rank 0's last checkpoint

    train_records = [r for r in history if r["train_loss"] is not None]
    val_records = [r for r in history if r["val_loss"] is not None]
    session_train_seconds = max(time.perf_counter() - start - paused_total, 1e-9)
    summary = {
        "steps": step, "max_steps": horizon, "stopped": stopped, "interrupted": stopped == "interrupt",
        "train_loss": train_records[-1]["train_loss"] if train_records else None,
        "val_loss": val_records[-1]["val_loss"] if val_records else None,
        "val_bpb": val_records[-1]["val_bpb"] if val_records else None,
        "tokens_per_s": session_tokens / session_train_seconds if session_steps else None,
        "seconds": elapsed(), "parameters": raw_model.num_parameters(), "checkpoint": str(out),
        "world_size": world,
    }
    if main:
        say(f"{'interrupted' if stopped == 'interrupt' else 'done'} at step {step} ({stopped}): "
            f"val loss {summary['val_loss']:.4f}, {summary['val_bpb']:.3f} bits/byte; checkpoint in {out}"
            + (" (continue with --resume)" if stopped in ("interrupt", "stop_at") else ""))
    return summary


def peak_memory(device) -> dict:
    """Peak resident memory of this process (MB; ru_maxrss is KiB on Linux, bytes on macOS) and, on CUDA, the
    peak memory torch allocated."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    record = {"peak_rss_mb": round(rss, 1)}
    if torch.device(device).type == "cuda":
        record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return record


STEP_COPIES = "checkpoints"  # out/checkpoints/step-NNNNNN/: full checkpoints kept by keep_last


def keep_step_copy(out: Path, step: int, keep: int) -> None:
    """Copy the checkpoint just saved in out to out/checkpoints/step-NNNNNN/ (hard links for the weights and
    trainer state, which are always replaced, never rewritten in place), then delete all but the newest `keep`.
    Each copy is a complete checkpoint: `tinyformer.load`, generate and --resume take it as is."""
    import shutil

    copies = out / STEP_COPIES
    copies.mkdir(exist_ok=True)
    target = copies / f"step-{step:06d}"
    tmp = copies / f".step-{step:06d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def link_or_copy(src, dst):
        if Path(src).name in ("model.safetensors", "trainer_state.pt"):
            try:
                return os.link(src, dst)
            except OSError:
                pass
        return shutil.copy2(src, dst)

    skip = {STEP_COPIES, LOCK_FILE, "metrics.jsonl", "loss.png"}
    shutil.copytree(out, tmp, copy_function=link_or_copy,
                    ignore=lambda d, names: [n for n in names if (Path(d) == out and n in skip) or ".tmp-" in n])
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in sorted(p for p in copies.iterdir() if re.fullmatch(r"step-\d+", p.name))[:-keep]:
        shutil.rmtree(old)


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and val loss against step, as a PNG written atomically (matplotlib's Agg canvas, no pyplot state)."""
    fig, ax = _figure()
    for key, label, marker in (("train_loss", "train", None), ("val_loss", "val", "o")):
        points = [(r["step"], r[key]) for r in history if r[key] is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker=marker, markersize=3)
    _save_figure(fig, ax, "step", path)


def plot_runs(run_dirs, path, x: str = "step") -> None:
    """Overlay several runs' val-loss curves (from each run's metrics.jsonl) against step, tokens or elapsed."""
    fig, ax = _figure()
    for run in map(Path, run_dirs):
        metrics = run / "metrics.jsonl"
        if not metrics.is_file():
            raise TrainError(f"{run} is not a training run: no metrics.jsonl in it")
        try:
            records = [json.loads(line) for line in metrics.read_text("utf-8").splitlines() if line.strip()]
        except ValueError as error:
            raise TrainError(f"{metrics} is corrupted: {error}") from None
        points = [(r.get(x), r["val_loss"]) for r in records if r.get("val_loss") is not None and r.get(x) is not None]
        if not points:
            raise TrainError(f"{run} has no val-loss records with {x!r} in metrics.jsonl")
        ax.plot(*zip(*points), label=run.name or str(run), marker="o", markersize=3)
    ax.set_title("val loss")
    _save_figure(fig, ax, {"elapsed": "seconds"}.get(x, x), Path(path))


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    return fig, fig.add_subplot()


def _save_figure(fig, ax, xlabel: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _differences(given, saved, allowed) -> list[str]:
    """"name value (saved value)" for each dataclass field outside `allowed` where `given` differs from `saved`."""
    return [f"{f.name} {getattr(given, f.name)!r} (saved {getattr(saved, f.name)!r})" for f in fields(given)
            if f.name not in allowed and getattr(given, f.name) != getattr(saved, f.name)]


def _load_for_resume(out: Path, model_config, train_config):
    saved_model, saved_train = resume_configs(out)
    if model_config is not None:
        check_same_architecture(out, saved_model.architecture, model_config.architecture)
        from_data = ("vocab_size", "src_vocab_size", "share_embeddings")  # set by the tokenizers, not the user
        diffs = _differences(model_config, saved_model, from_data)
        if diffs:
            raise TrainError(f"cannot resume {out}: the model config differs from the checkpoint's: "
                             f"{'; '.join(diffs)}; pass the saved config (or none)")
    if train_config is None:
        cfg = TrainConfig(**{**asdict(saved_train), "stop_at": None})
    else:
        diffs = _differences(train_config, saved_train, SESSION_FIELDS)
        if diffs:
            raise TrainError(f"cannot resume {out}: the train config differs from the checkpoint's: "
                             f"{'; '.join(diffs)}; only {', '.join(SESSION_FIELDS)} may change")
        cfg = train_config
    model, tokenizer, config = load_checkpoint(out)
    source_tokenizer = load_source_tokenizer(out, config)
    state = load_trainer_state(out)
    if state.get("step") != config.get("step"):
        raise CheckpointError(f"{out}: trainer_state.pt is from step {state.get('step')} but config.json from step "
                              f"{config.get('step')} (a save was interrupted)")
    return saved_model, cfg, model, tokenizer, source_tokenizer, state


def check_same_architecture(out, saved: str, asked: str) -> None:
    if saved != asked:
        raise TrainError(f"cannot resume {out}: it holds a {saved} model, and this run asks for {asked} "
                         f"(--arch {asked}); resume it as {saved} or train {asked} into another --out")


def _existing_step(out: Path):
    """The step of a checkpoint (or of anything checkpoint-like) already in out, else None."""
    if not any((out / name).exists() for name in ("config.json", "model.safetensors", "trainer_state.pt")):
        return None
    try:
        return json.loads((out / "config.json").read_text("utf-8")).get("step", "?")
    except (OSError, ValueError, AttributeError):
        return "?"


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and process_rank()[1] > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per process
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(name)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextmanager
def _deferred_interrupt():
    """Turn the first Ctrl-C (SIGINT) or SIGTERM (what `kill`, schedulers and torchrun send) into a flag the loop
    checks between steps, so it stops on a consistent state (never half-way through an optimizer update) and
    checkpoints. A second signal of the same kind acts at once; the last checkpoint is still intact because every
    save is atomic."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event  # signals only reach the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    restore = {sig: handler if handler is not None else (signal.default_int_handler if sig == signal.SIGINT
                                                          else signal.SIG_DFL)
               for sig, handler in previous.items()}

    def handler(signum, frame):
        event.set()
        signal.signal(signum, restore[signum])

    for sig in restore:
        signal.signal(sig, handler)
    try:
        yield event
    finally:
        for sig, original in restore.items():
            signal.signal(sig, original)


def process_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


@contextmanager
def _process_group(world: int, cfg: TrainConfig | None):
    """Join torchrun's process group for the run (gloo on CPU, nccl on CUDA), unless the caller already has."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        yield
        return
    device = (cfg.device if cfg is not None else "auto")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _agree(stopped: str | None, horizon: int | None, device) -> tuple[str | None, int | None]:
    """Every process takes the first stop reason any of them has and rank 0's schedule horizon."""
    reasons = [None, "max_steps", "stop_at", "time_budget", "interrupt"]
    flags = torch.tensor([reasons.index(stopped), -1 if horizon is None else horizon], device=device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return reasons[int(flags[0])], None if int(flags[1]) < 0 else int(flags[1])
