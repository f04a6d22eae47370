"""Translation quality on the classic small benchmarks (the quality half of benchmarks/translate.py).

French -> English: the "seq2seq tutorial" subset of ../shared/data/eng-fra.txt, normalised, filtered and split
exactly as ../shared/data/README.md says (11,822 pairs; pair i is test when i % 10 == 0). English -> Chinese:
../shared/data/eng-cmn.txt, pairs with fewer than 10 English words, the same split rule. Each run trains
tinyformer's seq2seq preset from scratch for a wall-clock budget on this machine, decodes the whole test split
greedily and with 4 beams, and scores it with sacrebleu (corpus BLEU with its 13a tokenizer, `zh` for Chinese
targets; chrF) and exact match.
"""
from __future__ import annotations

import re
import tempfile
import time
import unicodedata
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PREFIXES = ("i am ", "i m ", "he is", "he s ", "she is", "she s ", "you are", "you re ", "we are", "we re ",
            "they are", "they re ")


def normalise(text: str) -> str:
    """The tutorial's normalisation: lowercase ASCII without accents, letters and . ! ? only."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower().strip())
                   if unicodedata.category(c) != "Mn")
    text = re.sub(r"([.!?])", r" \1", text)
    return re.sub(r"[^a-zA-Z!?]+", " ", text).strip()


def french_english() -> tuple[list, list]:
    """(train, test) pairs as (french, english)."""
    pairs = []
    for line in (SHARED / "eng-fra.txt").read_text(encoding="utf-8").splitlines():
        english, french = (normalise(s) for s in line.split("\t")[:2])
        if len(english.split(" ")) < 10 and len(french.split(" ")) < 10 and english.startswith(PREFIXES):
            pairs.append((french, english))
    return _split(pairs)


def english_chinese() -> tuple[list, list]:
    """(train, test) pairs as (english, chinese), English under 10 words, text as written."""
    pairs = []
    for line in (SHARED / "eng-cmn.txt").read_text(encoding="utf-8").splitlines():
        english, chinese = (s.strip() for s in line.split("\t")[:2])
        if len(english.split(" ")) < 10:
            pairs.append((english, chinese))
    return _split(pairs)


def _split(pairs):
    return [p for i, p in enumerate(pairs) if i % 10], [p for i, p in enumerate(pairs) if i % 10 == 0]


def run(name: str, train_pairs, test_pairs, budgets=(300, 600), preset: str = "seq2seq", tokenizer: str = "bpe:2000",
        seed: int = 0, overrides: dict | None = None, log=print) -> list[dict]:
    """Train for each budget (a run of its own, so its schedule ends with its budget) and score the test split."""
    import tinyformer
    from tinyformer.evaluation import evaluate_translation
    from tinyformer.model import preset as model_preset
    from tinyformer.train import PRESET_TRAINING, TrainConfig, train

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{name}.tsv"
        data.write_text("".join(f"{s}\t{t}\n" for s, t in train_pairs), encoding="utf-8")
        for budget in budgets:
            model_config = model_preset(preset, **(overrides or {}).get("model", {}))
            train_config = TrainConfig(**{**PRESET_TRAINING[preset], "data": str(data), "tokenizer": tokenizer,
                                          "time_budget": budget, "seed": seed, "eval_interval": 10**9,
                                          **(overrides or {}).get("train", {})})
            start = time.perf_counter()
            summary = train(model_config, train_config, Path(tmp) / f"run{budget}", progress=False, log=None)
            trained = time.perf_counter() - start
            lm = tinyformer.load(Path(tmp) / f"run{budget}", device="cpu")
            for beams in (1, 4):
                t0 = time.perf_counter()
                result = evaluate_translation(lm, test_pairs, num_beams=beams, batch_size=64, progress=False)
                row = {"pairs": name, "budget_s": budget, "decode": "greedy" if beams == 1 else "beam 4",
                       "steps": summary["steps"], "val_loss": summary["val_loss"], "train_s": trained,
                       "bleu": result["bleu"], "chrf": result["chrf"], "exact": result["exact_match"],
                       "bleu_tokenize": result["bleu_tokenize"], "decode_s": time.perf_counter() - t0,
                       "sample": list(zip([s for s, _ in test_pairs[:3]], result["hypotheses"][:3]))}
                rows.append(row)
                log(f"{name} {budget}s {row['decode']}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.2f} "
                    f"exact {100 * row['exact']:.1f}% ({summary['steps']} steps, val loss {summary['val_loss']:.3f})")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| pairs | budget | decode | steps | val loss | BLEU | chrF | exact match |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pairs']} | {r['budget_s']} s | {r['decode']} | {r['steps']} | {r['val_loss']:.3f} | "
                     f"{r['bleu']:.2f} ({r['bleu_tokenize']}) | {r['chrf']:.2f} | {100 * r['exact']:.1f}% |")
    return "\n".join(lines)


def quality(budgets=(300, 600), which=("fra-eng", "eng-cmn"), seed: int = 0) -> list[dict]:
    if not (SHARED / "eng-fra.txt").is_file():
        print(f"skipped: {SHARED} is absent (the shared corpora sit beside the project)")
        return []
    rows = []
    if "fra-eng" in which:
        train_pairs, test_pairs = french_english()
        print(f"French -> English: {len(train_pairs)} train / {len(test_pairs)} test pairs")
        rows += run("fra-eng", train_pairs, test_pairs, budgets, seed=seed)
    if "eng-cmn" in which:
        train_pairs, test_pairs = english_chinese()
        print(f"English -> Chinese: {len(train_pairs)} train / {len(test_pairs)} test pairs")
        # characters on both sides (the English side too: one vocabulary); sentences of up to 9 English words run
        # past 64 characters, so this run gets 128 positions
        rows += run("eng-cmn", train_pairs, test_pairs, budgets[-1:], tokenizer="char", seed=seed,
                    overrides={"model": {"context_length": 128}})
    print(table(rows))
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="300,600", help="training seconds, comma-separated (default 300,600)")
    parser.add_argument("--pairs", default="fra-eng,eng-cmn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    quality(tuple(int(b) for b in args.budgets.split(",")), tuple(args.pairs.split(",")), args.seed)
