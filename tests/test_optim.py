"""Muon (float32 Newton-Schulz) against torch.optim.Muon, the optimizer split, and the learning-rate schedules."""
import math

import pytest
import torch

from tinyformer.model import GPT, ModelConfig, Seq2Seq
from tinyformer.optim import Muon, Optimizers, orthogonalize
from tinyformer.train import TrainConfig, TrainError, lr_at, make_optimizer, train

pytestmark = pytest.mark.usefixtures("one_thread")
COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's defaults


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])
def test_orthogonalize_matches_torch_and_flattens_the_spectrum(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz  # torch's, in bfloat16

    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(shape, generator=g) * 3
    ours = orthogonalize(matrix, COEFFICIENTS, 5, 1e-7)
    theirs = _zeropower_via_newtonschulz(matrix, COEFFICIENTS, 5, 1e-7).float()
    assert ours.dtype == torch.float32 and ours.shape == matrix.shape
    # bfloat16 rounds to ~0.4% per operation, so torch's result differs from float32 by ~1e-2 at entries of ~0.2;
    # a wrong coefficient, a missing transpose or normalisation gives differences of the entries' own size.
    torch.testing.assert_close(ours, theirs, atol=0.03, rtol=0)
    # Orthogonalization: the singular vectors are the input's, the singular values squeezed into ~[0.6, 1.2].
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    singular = torch.linalg.svdvals(ours)
    assert singular.min() > 0.5 and singular.max() < 1.25
    torch.testing.assert_close(u.T @ ours @ vh.T, torch.diag(torch.diagonal(u.T @ ours @ vh.T)), atol=1e-4,
                               rtol=0)


def test_muon_steps_like_torch_muon():
    torch.manual_seed(0)
    start = [torch.randn(24, 16), torch.randn(8, 24)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    runs = []
    for cls in (Muon, torch.optim.Muon):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = cls(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for step_grads in grads:
            for p, grad in zip(params, step_grads):
                p.grad = grad.clone()
            optimizer.step()
        runs.append((params, optimizer.state_dict()))
    (ours, our_state), (theirs, their_state) = runs
    for a, b, p0 in zip(ours, theirs, start):
        # 3 steps of lr 0.02 x 0.2 sqrt(24) ~ 0.02 each: float32 vs bfloat16 orthogonalization differs by ~1% of
        # that; a wrong lr scale, momentum or decay moves the weights by the size of the update itself (~0.02).
        assert (a - p0).abs().max() > 0.03
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    assert our_state["state"].keys() == their_state["state"].keys()  # the same state layout: momentum buffers
    torch.testing.assert_close(our_state["state"][0]["momentum_buffer"], their_state["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("model", [
    GPT(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, context_length=16, tie_embeddings=False)),
    Seq2Seq(ModelConfig(architecture="seq2seq", vocab_size=50, d_model=32, n_layers=1, n_heads=2,
                        context_length=16)),
], ids=["gpt-untied", "seq2seq"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(model):
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    in_adamw = {id(p) for g in adamw.param_groups for p in g["params"]}
    everything = {id(p) for p in model.parameters()}
    assert in_muon | in_adamw == everything and not in_muon & in_adamw
    hidden = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {id(model.lm_head.weight)}
    assert in_muon == hidden and id(model.tok_emb.weight) in in_adamw and id(model.lm_head.weight) in in_adamw
    assert len(optimizer.param_groups) == 3  # a schedule sets every group's lr
    with pytest.raises(ValueError, match="state of 2 optimizers"):
        optimizer.load_state_dict(adamw.state_dict())


def test_lr_schedules_by_hand():
    cosine = TrainConfig(lr=1.0, warmup_steps=10)  # cooldown 1: the classic warmup + cosine to lr / 10
    wsd = TrainConfig(lr=1.0, warmup_steps=10, decay="linear", min_lr=0.0, cooldown=0.5)
    assert [lr_at(s, cosine, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(60, cosine, 110) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_at(110, cosine, 110) == pytest.approx(0.1) and lr_at(500, cosine, 110) == pytest.approx(0.1)
    # warmup-stable-decay: 100 steps after warmup, the last 50 decay linearly to 0
    assert [lr_at(s, wsd, 110) for s in (9, 30, 60)] == [1.0, 1.0, 1.0]
    assert [lr_at(s, wsd, 110) for s in (70, 85, 110)] == pytest.approx([0.8, 0.5, 0.0])
    assert lr_at(50, wsd, None) == 1.0  # horizon not known yet (a time budget being measured): hold the peak
    half_cosine = TrainConfig(lr=1.0, warmup_steps=0, min_lr=0.0, cooldown=0.5)
    assert lr_at(75, half_cosine, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


@pytest.mark.parametrize("field, value, words", [
    ("optimizer", "sgd", "optimizer must be one of adamw, muon, got 'sgd'"),
    ("decay", "step", "decay must be one of cosine, linear, got 'step'"),
    ("cooldown", 0, "cooldown must be a fraction in (0, 1], got 0"),
    ("cooldown", 1.5, "cooldown must be a fraction in (0, 1], got 1.5"),
])
def test_bad_schedule_or_optimizer_is_a_clear_error(field, value, words):
    with pytest.raises(TrainError) as raised:
        TrainConfig(**{field: value})
    assert words in str(raised.value)


def test_muon_wsd_run_resumes_exactly(tmp_path):
    text = tmp_path / "fox.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 60)
    model = ModelConfig(d_model=32, n_layers=2, n_heads=2, context_length=16)

    def config(**overrides):
        return TrainConfig(**{**dict(data=str(text), batch_size=8, lr=1e-2, warmup_steps=3, max_steps=24,
                                     eval_interval=12, eval_iters=2, optimizer="muon", decay="linear", min_lr=0.0,
                                     cooldown=0.5, device="cpu"), **overrides})

    quiet = dict(progress=False, log=None)
    whole = train(model, config(), tmp_path / "whole", **quiet)
    train(model, config(stop_at=10), tmp_path / "split", **quiet)
    resumed = train(None, None, tmp_path / "split", resume=True, **quiet)
    assert resumed["val_loss"] == whole["val_loss"] < 2.5  # bit-identical: the Muon momentum is in the checkpoint


def test_optimizers_zero_grad_and_state_round_trip():
    a, b = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(3))
    optimizer = Optimizers(Muon([a], lr=0.1), torch.optim.AdamW([b], lr=0.1))
    a.grad, b.grad = torch.randn(4, 4), torch.randn(3)
    optimizer.step()
    state = optimizer.state_dict()
    optimizer.zero_grad()
    assert a.grad is None and b.grad is None
    again = Optimizers(Muon([a], lr=0.1), torch.optim.AdamW([b], lr=0.1))
    again.load_state_dict(state)
    torch.testing.assert_close(again.optimizers[0].state[a]["momentum_buffer"],
                               optimizer.optimizers[0].state[a]["momentum_buffer"])
