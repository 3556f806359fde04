"""What a model file says about itself (classes, preprocessing, the rest of its metadata), as every
inference backend reads it."""

from __future__ import annotations

from dataclasses import dataclass

from image_classifier.data.images import Preprocessing


@dataclass
class ModelMeta:
    classes: list[str]
    preprocessing: Preprocessing
    extra: dict

    @property
    def multi_label(self) -> bool:
        return bool(self.extra.get("multi_label"))

    def thresholds(self, override: float | None = None) -> list[float] | None:
        """Multi-label: each label's decision threshold (`override` for all of them when set);
        None for single-label models."""
        if not self.multi_label:
            return None
        if override is not None:
            return [float(override)] * len(self.classes)
        return [float(t) for t in self.extra.get("thresholds") or [0.5] * len(self.classes)]

    @property
    def name(self) -> str:
        """<data name>-<model name>, e.g. fashion_mnist-cnn: a registered model's default name,
        and what `serve` calls the model it serves."""
        from image_classifier.rules import safe_name

        data = self.extra.get("data_name") or "data"
        return safe_name(f"{data}-{(self.extra.get('model') or {}).get('name', 'model')}")

    @classmethod
    def from_dict(cls, d: dict) -> ModelMeta:
        return cls(
            classes=list(d["classes"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            extra=d,
        )
