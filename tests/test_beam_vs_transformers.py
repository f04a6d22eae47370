"""Beam search gives transformers' sequences and scores on the same weights (length penalty, early stopping)."""
import pytest
import torch

import tinyformer
from tinyformer.generation import beam_search


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.5, True), (2.0, False)])
def test_beam_search_equals_transformers(tmp_path, seed, length_penalty, early_stopping):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=12, n_positions=64, n_embd=32, n_layer=2, n_head=4, eos_token_id=2,
                        bos_token_id=1, pad_token_id=0)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(8)  # a peaked distribution with a small vocabulary: <eos> comes often
    hf.save_pretrained(tmp_path)
    lm = tinyformer.load(tmp_path, device="cpu")
    prompt = [5, 7, 3]
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), num_beams=4, max_new_tokens=10,
                      length_penalty=length_penalty, early_stopping=early_stopping, do_sample=False,
                      num_return_sequences=3, output_scores=True, return_dict_in_generate=True)
    expected = []
    for seq in out.sequences[:, len(prompt):].tolist():
        expected.append(seq[:seq.index(2) + 1] if 2 in seq else seq)  # transformers pads after <eos>
    ours = beam_search(lm.model, prompt, num_beams=4, max_new_tokens=10, eos_ids={2},
                       length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=3)
    assert [b.tokens + ([2] if b.finish_reason == "eos" else []) for b in ours] == expected
    # scores are O(1) mean log-probabilities; a hypothesis scored at the wrong length is off by 1e-1 or more
    assert [b.score for b in ours] == pytest.approx(out.sequences_scores.tolist(), rel=1e-5, abs=1e-6)
