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


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    return float(torch.nn.functional.cross_entropy(logits / temperature, targets))


def calibrate(module, loader) -> dict:
    """{"temperature", "nll_before", "nll_after", "ece_before", "ece_after", "note"} on the
    loader's data (the validation split). The fit minimises the NLL; the binned ECE is what users
    read, and on a few hundred images it can rise while the NLL falls: both are reported.
    A model that makes no mistake there gives the fit nothing to stop at: the likelihood only
    grows as T falls, and T would end at its floor, every later answer near 100 % sure. Then T
    stays 1 and `note` says why."""
    logits, targets = validation_logits(module, loader)
    before = {"nll_before": nll(logits, targets), "ece_before": ece(logits, targets)}
    if bool((logits.argmax(1) == targets).all()):
        note = f"not fitted: no mistakes on the {len(targets)} validation images to fit it on"
        after = {"nll_after": before["nll_before"], "ece_after": before["ece_before"]}
        return {"temperature": 1.0, **before, **after, "note": note}
    t = fit_temperature(logits, targets)
    return {
        "temperature": round(t, 4),
        **before,
        "nll_after": nll(logits, targets, t),
        "ece_after": ece(logits, targets, t),
        "note": "fitted on val"
        + (f", at its ceiling {T_RANGE[1]:g}: the answers say little" if t >= T_RANGE[1] else ""),
    }


def fitted_line(c: dict) -> str:
    """ "temperature 0.927 (fitted on val); NLL 0.52 -> 0.49, ECE 0.086 -> 0.103": one wording for
    train's summary and `command=calibrate`."""
    return (
        f"temperature {c['temperature']:.3f} ({c['note']}); NLL {c['nll_before']:.4f} -> "
        f"{c['nll_after']:.4f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}"
    )
