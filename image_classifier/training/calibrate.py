"""Temperature scaling (Guo et al., 2017): one scalar T, fitted on the validation split by
minimising the negative log-likelihood of softmax(logits / T), with a prior that holds T near 1
when the split is small. Accuracy is unchanged; the confidences become honest. The fitted T goes
into the checkpoint, so `test`, the ONNX export, `infer` and `serve` all return the same
calibrated probabilities."""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassCalibrationError

from image_classifier.models.metrics import by_confidence

T_RANGE = (0.05, 20.0)  # a fit that ends on a bound says so
# The prior: a Gaussian on log T around 0 weighing PRIOR / 2 * log(T)^2 against the summed
# log-loss of the validation images. On 5,000 images it moves T by under 1 %; on a few dozen it
# keeps T from chasing noise, and on a split the model gets all right it gives the fit a stop
# short of T's floor. 20 chosen against 10 and 30 (and 5, 50) on four small sets' held-out images
# (docs/benchmarks.md, "calibration on small validation splits").
PRIOR = 20.0


@torch.no_grad()
def validation_logits(module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    outs, ys = [], []
    for batch in loader:
        logits, y = module._step(batch)
        outs.append(logits.float())
        ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, prior: float = PRIOR) -> float:
    """The T of the most probable log T: mean log-loss + prior / (2 n) * log(T)^2."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")
    weight = prior / (2 * len(targets))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss = loss + weight * log_t**2
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
    """{"temperature", "nll_before", "nll_after", "ece_before", "ece_after", "note",
    "by_confidence"} on the
    loader's data (the validation split). The fit minimises the NLL (with the prior); the binned
    ECE is what users read, and on a few hundred images it can rise while the NLL falls: both are
    reported."""
    logits, targets = validation_logits(module, loader)
    t = fit_temperature(logits, targets)
    note = f"fitted on {len(targets)} val images"
    if t >= T_RANGE[1]:
        note += f", at its ceiling {T_RANGE[1]:g}: the answers say little"
    return {
        "temperature": round(t, 4),
        "nll_before": nll(logits, targets),
        "nll_after": nll(logits, targets, t),
        "ece_before": ece(logits, targets),
        "ece_after": ece(logits, targets, t),
        "note": note,
        # what each confidence floor keeps on validation: infer.min_confidence is chosen here
        "by_confidence": by_confidence(torch.softmax(logits / t, dim=1).numpy(), targets.numpy()),
    }


def fitted_line(c: dict) -> str:
    """ "temperature 0.927 (fitted on 84 val images); NLL 0.52 -> 0.49, ECE 0.086 -> 0.103": one
    wording for train's summary and `command=calibrate`."""
    return (
        f"temperature {c['temperature']:.3f} ({c['note']}); NLL {c['nll_before']:.4f} -> "
        f"{c['nll_after']:.4f}, ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f}"
    )


def stored_line(before, after) -> str:
    """What `command=calibrate` changed: a temperature (or thresholds) that moved by less than
    the summary's rounding changes nothing downstream."""
    same = torch.tensor(before, dtype=torch.float64) - torch.tensor(after, dtype=torch.float64)
    if same.abs().max() < 5e-4:
        return "the same as the checkpoint held: exports and registered models made from it stand"
    return (
        "stored in the checkpoint; `command=test` reports it, and an ONNX file exported before "
        "now needs `command=export-onnx` again"
    )
