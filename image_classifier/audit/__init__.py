"""`command=audit`: what is wrong with a dataset, before hours go into training on it.

On any dataset the project reads (`data=fashion_mnist`, `data=folder data.root=...`), split as
training would split it:
  - class counts per split and the imbalance ratio;
  - files that are not usable images, with the reason;
  - exact duplicates (identical content), within and across splits, with conflicting labels;
  - near-duplicates: pixel neighbours whose thumbnails differ by a few grey levels once brightness
    and contrast are matched; pairs across train and val/test reported as leaks (`neighbours.py`);
  - label issues by confident learning on cross-validated probabilities of one scikit-learn
    classifier per feature view (backbone features and pixels), averaged (`labels.py`);
  - outliers, far from every other image in feature space (`neighbours.py`);
  - image quality: dark, light, low-information, blurry, odd size or aspect ratio, grey files in
    a colour data set (`quality.py`).
Output: report.json, label_issues.csv and near_duplicates.csv (ranked), example grids, a console
summary, an MLflow run. The command is `run.run_audit`.
"""
