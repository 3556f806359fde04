"""The training losses: the task's own (cross-entropy, or binary cross-entropy per label) and
the supervised contrastive term."""

import torch
import torch.nn.functional as F


def supcon_loss(
    features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over one view per sample: embeddings of
    the same class are pulled together, the rest pushed apart. `labels` may be soft (mixup): the
    argmax class is used."""
    if labels.ndim == 2:
        labels = labels.argmax(1)
    z = F.normalize(features.float(), dim=1)
    logits = z @ z.T / temperature
    n = len(labels)
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positives.sum(1)
    has_pos = count > 0
    if not has_pos.any():
        return features.sum() * 0.0
    mean_log_prob_pos = (log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos]) / count[has_pos]
    return -mean_log_prob_pos.mean()


def task_loss(logits, target, multi_label: bool, weight=None, label_smoothing=None):
    """Cross-entropy (with class weights and label smoothing when given; `target` may be soft,
    as MixUp/CutMix make it), or binary cross-entropy per label for multi-label data."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return F.cross_entropy(
        logits, target, weight=weight, label_smoothing=float(label_smoothing or 0)
    )


def forward_loss(net, x, target, loss_fn, optim: dict):
    """(a batch's training loss, its logits): `loss_fn` of the logits, plus the supervised
    contrastive term of the pooled features when train.supcon_weight > 0."""
    supcon = float(optim.get("supcon_weight") or 0.0)
    if supcon <= 0:
        logits = net(x)
        return loss_fn(logits, target), logits
    features, logits = net.features_and_logits(x)
    temperature = float(optim.get("supcon_temperature", 0.1))
    return loss_fn(logits, target) + supcon * supcon_loss(features, target, temperature), logits
