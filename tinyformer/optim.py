"""Optimizers the trainer combines: Muon for the hidden weight matrices, AdamW for the rest, stepped as one.

Muon (Keller Jordan, 2024; the modded-nanogpt speedrun's optimizer) replaces each hidden matrix's momentum update by
the nearest semi-orthogonal matrix, computed by a few Newton-Schulz iterations. It is torch's own
torch.optim.Muon, except for one thing: torch orthogonalizes in bfloat16, and a CPU without native bfloat16 matrix
units (AVX2, AVX-512 without BF16) emulates that ~15x slower than float32 (measured on this project's AVX2 machine:
a Muon step took 1 s instead of 0.1 s); here it runs in float32 on every device.
"""
from __future__ import annotations

import torch


def orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """Newton-Schulz's approximately semi-orthogonal factor of `matrix` (singular values pushed into ~[0.7, 1.2]),
    in float32: the iteration of torch.optim.Muon (quintic, coefficients maximizing the slope at zero)."""
    a, b, c = coefficients
    x = matrix.float()
    wide = x.T if x.size(0) > x.size(1) else x  # iterate on the side with the smaller Gram matrix
    wide = wide / wide.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: singular values now <= 1
    for _ in range(steps):
        gram = wide @ wide.T
        wide = torch.addmm(wide, torch.addmm(gram, gram, gram, beta=b, alpha=c), wide, beta=a)
    return wide.T if x.size(0) > x.size(1) else wide


def lr_scale(shape: torch.Size, adjust: str | None) -> float:
    """torch.optim.Muon's per-matrix learning-rate factor for a [rows, columns] matrix."""
    rows, columns = shape
    if adjust == "match_rms_adamw":  # Moonshot: updates with AdamW's RMS, so AdamW's lr and weight decay carry over
        return 0.2 * max(rows, columns) ** 0.5
    return max(1.0, rows / columns) ** 0.5  # "original" (Keller Jordan's) and torch's default


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same arguments, state and algorithm) orthogonalizing in float32."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(grad))
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW's
                param.add_(update.to(param.dtype), alpha=-lr * lr_scale(param.shape, group["adjust_lr_fn"]))
        return loss


class Optimizers:
    """Several optimizers over disjoint parameters, used as one: param_groups lists every group (so a schedule sets
    each one's lr), and zero_grad, step and the state dict cover them all."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} optimizers, got another optimizer's state")
        for optimizer, optimizer_state in zip(self.optimizers, states):
            optimizer.load_state_dict(optimizer_state)
