"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on the validation split by
minimising the negative log-likelihood of softmax(logits / T). Accuracy is unchanged; the
confidences become honest. The fitted T goes into the checkpoint, so `test`, the ONNX export,
`infer` and `serve` all return the same calibrated probabilities."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassCalibrationError

T_RANGE = (0.05, 20.0)  # a fit that ends on a bound says so


@torch.no_grad()
def validation_logits(module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    outs, ys = [], []
    for batch in loader:
        logits, y = module._step(batch)
        outs.append(logits.float())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(*T_RANGE))


def ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    metric = MulticlassCalibrationError(logits.shape[1], n_bins=15, norm="l1")
    return float(metric(torch.softmax(logits / temperature, dim=1), targets))


def calibrate(module, loader) -> dict:
    """{"temperature", "ece_before", "ece_after", "note"} on the loader's data (the validation
    split). A model that makes no mistake there gives the fit nothing to stop at: the likelihood
    only grows as T falls, and T would end at its floor, every later answer near 100 % sure.
    Then T stays 1 and `note` says why."""
    logits, targets = validation_logits(module, loader)
    before = ece(logits, targets)
    if bool((logits.argmax(1) == targets).all()):
        note = f"not fitted: no mistakes on the {len(targets)} validation images to fit it on"
        return {"temperature": 1.0, "ece_before": before, "ece_after": before, "note": note}
    t = fit_temperature(logits, targets)
    return {
        "temperature": round(t, 4),
        "ece_before": before,
        "ece_after": ece(logits, targets, t),
        "note": "fitted on val"
        + (f", at its ceiling {T_RANGE[1]:g}: the answers say little" if t >= T_RANGE[1] else ""),
    }
