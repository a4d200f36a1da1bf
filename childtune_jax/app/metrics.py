"""GLUE metrics, exactly as GLUE reports them (scikit-learn and SciPy)."""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import stats
from sklearn import metrics as skm

logger = logging.getLogger(__name__)


def glue_metrics(names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict:
  """Scores ``predictions`` (class ids, or scores for regression) against ``labels``.

  A metric that is undefined (a correlation of a constant column) is ``None``, with a
  warning, never NaN.
  """
  out = {}
  for name in names:
    if name == "accuracy":
      out[name] = float(skm.accuracy_score(labels, predictions))
    elif name == "f1":
      out[name] = float(skm.f1_score(labels, predictions))
    elif name == "matthews":
      out[name] = float(skm.matthews_corrcoef(labels, predictions))
    elif name in ("pearson", "spearman"):
      if len(labels) < 2 or np.ptp(labels) == 0 or np.ptp(predictions) == 0:
        out[name] = float("nan")  # undefined; scipy would warn and return NaN
      else:
        corr = stats.pearsonr if name == "pearson" else stats.spearmanr
        out[name] = float(corr(predictions, labels)[0])
    else:
      raise ValueError(f"unknown metric {name!r}")
  for name, value in out.items():
    if not math.isfinite(value):
      logger.warning("%s is undefined here (a constant column?): reported as null", name)
      out[name] = None
  return out


def confusion(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> list[list[int]]:
  """Counts of examples by gold label (rows) and predicted class (columns), both ``0..n-1``."""
  return skm.confusion_matrix(labels, predictions, labels=list(range(num_labels))).tolist()
