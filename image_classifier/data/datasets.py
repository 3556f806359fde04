"""The three kinds of torch Dataset the data module hands to its loaders: in-memory arrays
(IDX data, the decoded cache), the same with per-image augmentation, and image files read and
decoded per item."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from image_classifier.data.images import ImageError, Preprocessing, load_array
from image_classifier.errors import UserError


class ArrayDataset(Dataset):
    """In-memory uint8 images; `__getitems__` makes a whole batch one indexing operation.

    When the model wants another size or channel count than the arrays have, each image goes
    through the same PIL preprocessing as a decoded file (`images.to_array`), so what training
    sees is what `infer` computes from the image saved as PNG.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        pre: Preprocessing | None = None,
        items: list | None = None,
    ):
        """`items`: the (path, label) each row was decoded from (decoded cache of files)."""
        self.images, self.labels, self.items = images, labels, items
        native = (images.shape[1], tuple(images.shape[2:]))
        self.pre = pre if pre is not None and (pre.channels, tuple(pre.size)) != native else None

    def __len__(self):
        return len(self.labels)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        from image_classifier.data.images import to_array

        return torch.from_numpy(to_array(Image.fromarray(x[0].numpy()), self.pre))

    def __getitem__(self, i):
        x = self.images[i]
        return (self._convert(x) if self.pre else x), self.labels[i]

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices)
        x = self.images.index_select(0, idx)  # much faster than images[idx] for uint8 rows
        if self.pre:
            x = torch.stack([self._convert(img) for img in x])
        return x, self.labels.index_select(0, idx)


class AugmentedDataset(Dataset):
    """The train split with per-image augmentation (torchvision v2 on uint8 tensors)."""

    def __init__(self, base: Dataset, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.transform(x), y

    def __getitems__(self, indices):
        if hasattr(self.base, "__getitems__"):
            x, y = self.base.__getitems__(indices)
            return torch.stack([self.transform(img) for img in x]), y
        return [self[i] for i in indices]


class FileDataset(Dataset):
    """Image files; a multi-label item's label (a tuple of class indices) becomes a 0/1 float
    vector over `num_classes`, what BCE and the multi-label metrics take."""

    def __init__(self, items: list[tuple[str, object]], pre: Preprocessing, num_classes: int = 0):
        self.items, self.pre, self.num_classes = items, pre, num_classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            arr = load_array(path, self.pre)
        except ImageError as e:  # it decoded when the data was scanned: changed since?
            raise UserError(f"Image became unreadable during training: {e}") from None
        return torch.from_numpy(arr), self.target(label)

    def target(self, label):
        if not isinstance(label, tuple):
            return label
        y = torch.zeros(self.num_classes, dtype=torch.float32)
        y[list(label)] = 1.0
        return y
