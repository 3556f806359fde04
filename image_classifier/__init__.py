"""image_classifier: a folder of labelled images to a trained, tested and exported classifier."""

__version__ = "0.1.0"
