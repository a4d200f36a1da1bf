"""GLUE metrics, exactly as GLUE reports them (scikit-learn and SciPy)."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def glue_metrics(names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict:
  """Scores ``predictions`` (class ids, or scores for regression) against ``labels``."""
  out = {}
  for name in names:
    if name == "accuracy":
      out[name] = float(skm.accuracy_score(labels, predictions))
    elif name == "f1":
      out[name] = float(skm.f1_score(labels, predictions))
    elif name == "matthews":
      out[name] = float(skm.matthews_corrcoef(labels, predictions))
    elif name == "pearson":
      out[name] = float(stats.pearsonr(predictions, labels)[0])
    elif name == "spearman":
      out[name] = float(stats.spearmanr(predictions, labels)[0])
    else:
      raise ValueError(f"unknown metric {name!r}")
  return out
