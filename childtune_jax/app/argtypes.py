"""Checking converters for argparse's ``type``: a value outside its range is refused by name."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def checked(convert: type, ok: Callable[[Any], bool], requirement: str) -> Callable[[str], Any]:
  """An argparse ``type`` that converts with ``convert`` and checks ``ok(value)``."""
  noun = "an integer" if convert is int else "a number"

  def parse(text: str) -> Any:
    try:
      value = convert(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
    if not ok(value):  # NaN fails every check
      raise argparse.ArgumentTypeError(f"{requirement}, got {text}")
    return value

  return parse


reserve_p = checked(float, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
positive_int = checked(int, lambda v: v >= 1, "must be at least 1")
non_negative_int = checked(int, lambda v: v >= 0, "must be at least 0")
seed = checked(int, lambda v: 0 <= v < 2**32, "seeds are integers in [0, 2**32)")
positive_float = checked(float, lambda v: 0 < v < float("inf"), "must be positive and finite")
non_negative = checked(float, lambda v: 0 <= v < float("inf"), "must be finite and >= 0")
fraction = checked(float, lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
