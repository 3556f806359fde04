"""image_classifier: a folder of labelled images to a trained, tested and exported classifier."""

from pathlib import Path

__version__ = "0.1.0"

# the Hydra configs (commands.py composes them; model=auto reads the model configs it chooses)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
