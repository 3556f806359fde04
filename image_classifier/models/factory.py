"""`create_model(name, *, num_classes, in_chans, ...)`: our own nets and any timm architecture."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from image_classifier.errors import UserError, did_you_mean

OWN_MODELS = ("cnn", "baseline", "head")


class SimpleCNN(nn.Module):
    """Stages of (conv-BN-ReLU) x convs_per_stage, then global pooling, dropout, a linear head.

    `convs_per_stage`: one count for every stage, or a list with a count per stage.

    `downsample="end"`: a stage ends with a 2x2 max-pool (VGG; the last stage does not pool).
    `downsample="early"`: every stage pools right after its first convolution, as airbench's
    CIFAR-10 net does, so the later convolutions run at a quarter of the pixels: about 2.6x the
    training throughput of "end" at the same widths on a 2-core CPU.
    """

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        channels=(32, 64, 128),
        convs_per_stage: int | list[int] = 2,
        dropout: float = 0.2,
        downsample: str = "end",
        global_pool: str = "avg",
    ):
        super().__init__()
        if downsample not in ("end", "early") or global_pool not in ("avg", "max"):
            raise UserError(
                f"model.downsample={downsample!r} / model.global_pool={global_pool!r}: "
                "downsample takes end or early, global_pool avg or max."
            )
        counts = _per_stage(convs_per_stage, channels)
        layers: list[nn.Module] = []
        c_in = in_chans
        for i, (c_out, n) in enumerate(zip(channels, counts, strict=True)):
            for j in range(n):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
                if downsample == "early" and j == 0:
                    layers.append(nn.MaxPool2d(2))
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            if downsample == "end" and i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes))

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _per_stage(convs_per_stage, channels) -> list[int]:
    """One conv count per stage, from a single count or a list of them."""
    if isinstance(convs_per_stage, int) and not isinstance(convs_per_stage, bool):
        counts = [convs_per_stage] * len(channels)
    else:
        listed = isinstance(convs_per_stage, Sequence) and not isinstance(convs_per_stage, str)
        counts = list(convs_per_stage) if listed else []
    if len(counts) != len(channels) or any(type(n) is not int or n < 1 for n in counts):
        raise UserError(
            f"model.convs_per_stage={counts or convs_per_stage!r} with model.channels="
            f"{list(channels)}: give one count >= 1 for every stage, or a list of "
            f"{len(channels)} such counts."
        )
    return counts


class MostFrequentClass(nn.Module):
    """Baseline: always the class most frequent in the training data (its logits are log-priors)."""

    def __init__(self, in_chans: int, num_classes: int, class_counts=None):
        super().__init__()
        counts = torch.as_tensor(
            class_counts if class_counts is not None else [1] * num_classes, dtype=torch.float32
        )
        self.register_buffer("logits", torch.log(counts.clamp_min(1) / counts.sum()))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


class FeatureClassifier(nn.Module):
    """A pretrained backbone (pooled features) and a small head: trained on cached features,
    deployed whole, so one model file goes from pixels to classes."""

    def __init__(
        self, backbone: nn.Module, dim: int, num_classes: int, hidden=(), dropout: float = 0.0
    ):
        super().__init__()
        self.backbone = backbone
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(dim, h), nn.GELU(), nn.Dropout(dropout)]
            dim = h
        self.head = nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.head(self.backbone(x))


class Normalized(nn.Module):
    """The deployed network: takes float pixels in 0..255 and applies the data's mean/std itself."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def normalize(self, x):
        return x.float() * self.scale + self.shift

    def forward(self, x):
        return self.net(self.normalize(x))

    def features_and_logits(self, x):
        """(pre-logit embedding, logits) for losses that need the embedding (SupCon)."""
        net = self.net
        if not (hasattr(net, "forward_features") and hasattr(net, "forward_head")):
            raise UserError(
                f"{type(net).__name__} exposes no embedding; train.supcon_weight needs one."
            )
        f = net.forward_head(net.forward_features(self.normalize(x)), pre_logits=True)
        return f, net.get_classifier()(f)


# model config keys that steer training, not the architecture
TRAINING_KEYS = ("freeze_backbone", "unfreeze_at_epoch", "mean", "std", "init_from")


def build_network(model: dict, classes: list[str], preprocessing: dict) -> Normalized:
    """The network `model` names, for these classes and preprocessing, normalising inside: what
    training builds and what a checkpoint's weights load into."""
    spec = {k: v for k, v in model.items() if k not in TRAINING_KEYS}
    name = spec.pop("name")
    net = create_model(name, num_classes=len(classes), in_chans=preprocessing["channels"], **spec)
    return Normalized(net, preprocessing["mean"], preprocessing["std"])


def probabilities(logits: torch.Tensor, temperature, multi_label: bool) -> torch.Tensor:
    """What every backend returns: softmax(logits / temperature), or for multi-label data one
    sigmoid per label."""
    if multi_label:
        return torch.sigmoid(logits.float() / temperature)
    return torch.softmax(logits.float() / temperature, dim=1)


class TrainedNetwork(nn.Module):
    """A checkpoint's network with what predicting needs and nothing of training: the PyTorch
    predictor's model, without Lightning or torchmetrics to import. It answers what
    `model_description` asks of the LightningModule (hparams, classes, temperature, ...)."""

    def __init__(self, hparams: dict):
        super().__init__()
        self.hparams = hparams
        self.classes = list(hparams["classes"])
        self.multi_label = bool(hparams.get("multi_label", False))
        self.net = build_network(hparams["model"], self.classes, hparams["preprocessing"])
        self.register_buffer("temperature", torch.ones(()))
        if self.multi_label:  # the tuned per-class thresholds come with the weights
            self.register_buffer("thresholds", torch.zeros(len(self.classes)))
        self.tta = None  # the LightningModule's too, until `test.tta` sets it
        self.mlflow_run_id = None

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature, self.multi_label)

    def forward(self, x):
        return self.probabilities(self.net(x))


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    pretrained: bool = False,
    class_counts=None,
    **kwargs,
) -> nn.Module:
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name == "cnn":
        return SimpleCNN(in_chans, num_classes, **kwargs)
    if name == "baseline":
        return MostFrequentClass(in_chans, num_classes, class_counts=class_counts)
    if name == "head":  # backbone + head; the backbone's own pretrained weights come first
        backbone = create_model(
            kwargs.pop("backbone"), num_classes=0, in_chans=in_chans, pretrained=pretrained
        )
        return FeatureClassifier(backbone, int(kwargs.pop("dim")), num_classes, **kwargs)
    import timm

    if not timm.is_model(name):
        options = list(OWN_MODELS) + timm.list_models()
        raise UserError(
            f"Unknown model {name!r}.{did_you_mean(name, options)} model.name takes "
            f'{", ".join(OWN_MODELS)} or any timm architecture (`uv run python -c "import timm; '
            "print(timm.list_models('*resnet*'))\"` lists them)."
        )
    if pretrained:
        from image_classifier.models.pretrained import create_pretrained_timm

        return create_pretrained_timm(
            name, pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
        )
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def create_backbone(fcfg, pretrained=None) -> nn.Module:
    """The frozen feature extractor of cfg.features (`command=cache-features`, the audit's backbone
    view): pixels 0..255 in, pooled features out (normalises inside)."""
    from image_classifier.data.features import backbone_preprocessing

    pre = backbone_preprocessing(fcfg)
    p = fcfg.pretrained if pretrained is None else pretrained
    net = create_model(fcfg.backbone, num_classes=0, in_chans=pre.channels, pretrained=p)
    return Normalized(net, pre.mean, pre.std).eval()


PROBED_BELOW = 64  # sides from which a network is tried on a blank image before training


def check_input_size(net: nn.Module, pre, name: str) -> None:
    """A network that pools an image down to nothing failed deep in torch ("Output size is too
    small") after the data was read: try small sizes on one blank image first, and name the
    smallest square the network takes. (A head on cached features takes features: not tried.)"""
    channels, size = int(pre.channels), tuple(pre.size)
    if name == "head" or min(size) >= PROBED_BELOW:
        return

    def fits(h: int, w: int) -> bool:
        try:
            with torch.no_grad():
                net(torch.zeros(1, channels, h, w))
            return True
        except RuntimeError:
            return False

    was_training = net.training
    net.eval()
    try:
        if fits(*size):
            return
        smallest = next((s for s in range(2, PROBED_BELOW + 1) if fits(s, s)), PROBED_BELOW)
    finally:
        net.train(was_training)
    raise UserError(
        f"data.size={list(size)} is too small for model.name={name}: its pooling leaves nothing of "
        f"the image. It takes {smallest}x{smallest} px or more: data.size={smallest} or larger, "
        "or data.size=auto."
    )
