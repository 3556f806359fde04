"""Muon for the hidden layers, AdamW for the rest, as one optimizer (`train.optimizer=muon`).

Muon (Keller Jordan, 2024; used by airbench's fastest CIFAR-10 runs) replaces each hidden
weight's momentum update by its nearest semi-orthogonal matrix, found with a few Newton-Schulz
iterations. It suits the weights of hidden convolutions and linear layers; the stem, the
classifier, biases and norms keep AdamW. `torch.optim.Muon` takes 2-D parameters only and runs
its iterations in bfloat16, which CPUs without bfloat16 instructions do 13-17x slower than float32
(measured on a 2-core AVX2 machine: scripts/benchmark_train.py --optimizer), so this class views
each conv filter bank as a matrix (out, in*kh*kw) and iterates in float32 on CPU, bfloat16 on
CUDA. The step size follows Moonshot's `match_rms_adamw` scaling
(`torch.optim.Muon(adjust_lr_fn="match_rms_adamw")`): the update's RMS matches AdamW's, so both
groups share `train.lr` and its schedule; `lr_scale` (`train.muon_lr_scale`) multiplies the
hidden weights' step on top (schedules keep scaling both groups alike).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# the quintic Newton-Schulz coefficients of Keller Jordan's Muon (also torch.optim.Muon's)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MOMENTUM = 0.95


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """About U V^T of g = U S V^T (singular values pushed into roughly [0.7, 1.2])."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x if wide else x.T).to(g.dtype)


def hidden_weights(net: nn.Module) -> list[nn.Parameter]:
    """The weights Muon steps: every convolution and linear layer but the first (the stem, which
    sees raw pixels) and the classifier."""
    layers = [
        m for m in net.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)
    ]
    heads = net.get_classifier() if hasattr(net, "get_classifier") else layers[-1:]
    heads = heads if isinstance(heads, tuple | list) else (heads,)  # timm: one head or a tuple
    skip = {id(p) for h in heads for p in h.parameters()}
    return [m.weight for m in layers[1:] if m.weight.requires_grad and id(m.weight) not in skip]


class MuonAdamW(torch.optim.AdamW):
    """torch's AdamW for the groups with `muon=False`; Muon for those with `muon=True`."""

    def __init__(
        self, params, lr: float, weight_decay: float, net: nn.Module | None, lr_scale: float = 1.0
    ):
        """`net`: the network whose hidden weights Muon steps; None: AdamW for every parameter
        (a pretrained network being fine-tuned). `lr_scale`: Muon's step is `lr_scale` times
        the AdamW-matched one (checked by `train.muon_lr_scale`'s factory)."""
        params = list(params)
        muon_ids = {id(p) for p in hidden_weights(net)} if net is not None else set()
        groups = [
            {
                "params": [p for p in params if id(p) in muon_ids],
                "muon": True,
                "lr_scale": lr_scale,
            },
            {"params": [p for p in params if id(p) not in muon_ids], "muon": False},
        ]
        groups = [g for g in groups if g["params"]]
        super().__init__(groups, lr=lr, weight_decay=weight_decay)
        self.defaults["muon"] = False  # groups added later (fine-tuning unfreezes) use AdamW

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]
        try:
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("muon"):
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, decay, lr_scale = group["lr"], group["weight_decay"], group.get("lr_scale", 1.0)
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad.reshape(p.shape[0], -1)
            state = self.state[p]
            if "momentum_buffer" not in state:  # "step" too: AdamW's load_state_dict reads it
                state["step"] = torch.tensor(0.0)
                state["momentum_buffer"] = torch.zeros_like(grad)
            state["step"] += 1
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - MOMENTUM)
            update = orthogonalize(grad.lerp(buf, MOMENTUM))  # Nesterov
            scale = 0.2 * math.sqrt(max(grad.shape))  # match_rms_adamw
            p.mul_(1 - lr * decay)
            p.add_(update.reshape(p.shape), alpha=-lr * lr_scale * scale)
