"""Where MLflow models logged before the pyfunc model moved to `image_classifier/export/` look for
their class: loading them still works."""

from image_classifier.export.mlflow_model import ImageClassifierModel  # noqa: F401
