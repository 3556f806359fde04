"""Losses beyond cross-entropy."""

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
