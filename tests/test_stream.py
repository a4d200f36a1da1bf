"""The metrics stream: JSON lines that a crash leaves readable, TensorBoard events read back
with TensorBoard's own reader, and a resume that continues the stream without a step twice."""

from __future__ import annotations

import json
import os

import pytest

from childtune_jax.app import stream


def tensorboard_scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
  """Every scalar of the event files in ``folder``: ``{tag: [(step, value), ...]}``, as
  TensorBoard shows them (its reader purges the events a restart's ``purge_step`` orphans)."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  acc = EventAccumulator(folder, size_guidance={"scalars": 0})
  acc.Reload()
  scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
  return {tag: events for tag, events in scalars.items() if events}  # a purged tag: none


pytest.importorskip("tensorboardX")
pytest.importorskip("tensorboard")


def test_a_resume_drops_the_steps_past_its_checkpoint_in_both_forms(tmp_path):
  folder = str(tmp_path / "seed-1")
  first = stream.MetricsStream(folder, start=0, report_to="tensorboard")
  for step in range(1, 11):
    first.write(step, {"train/loss": 1.0 / step})
  first.evaluation(10, {"dev": {"accuracy": 0.5}})
  first.close()
  again = stream.MetricsStream(folder, start=6, report_to="tensorboard")  # its checkpoint: 6
  for step in range(7, 9):
    again.write(step, {"train/loss": 2.0 / step})
  again.close()
  records = stream.read(os.path.join(folder, "metrics.jsonl"))
  want = [(s, 1.0 / s) for s in range(1, 7)] + [(s, 2.0 / s) for s in (7, 8)]
  assert [(r["step"], r["train/loss"]) for r in records] == want
  board = tensorboard_scalars(os.path.join(folder, "tensorboard"))
  assert set(board) == {"train/loss"}  # the evaluation at step 10 was past the checkpoint
  assert [s for s, _ in board["train/loss"]] == [s for s, _ in want]
  assert [v for _, v in board["train/loss"]] == pytest.approx([v for _, v in want], rel=1e-6)


def test_non_finite_values_are_null_in_json_and_absent_from_tensorboard(tmp_path):
  folder = str(tmp_path / "seed-1")
  s = stream.MetricsStream(folder, start=0, report_to="tensorboard")
  s.write(1, {"train/loss": float("nan"), "train/grad_norm": 2.0})
  s.evaluation(1, {"dev": {"pearson": float("inf")}, "selection": 0.25})
  s.close()
  with open(os.path.join(folder, "metrics.jsonl")) as f:
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
             for line in f]
  assert lines == [{"step": 1, "train/loss": None, "train/grad_norm": 2.0},
                   {"step": 1, "eval/dev/pearson": None, "eval/selection": 0.25}]
  board = tensorboard_scalars(os.path.join(folder, "tensorboard"))
  assert board == {"train/grad_norm": [(1, 2.0)], "eval/selection": [(1, 0.25)]}


def test_a_crash_mid_line_leaves_every_whole_line_readable(tmp_path):
  folder = str(tmp_path / "seed-1")
  s = stream.MetricsStream(folder, start=0, report_to="none")
  s.write(1, {"train/loss": 0.5})
  s.write(2, {"train/loss": 0.25})
  s.close()
  path = os.path.join(folder, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"step": 3, "train/lo')  # killed while writing
  assert [r["step"] for r in stream.read(path)] == [1, 2]
  assert not os.path.exists(os.path.join(folder, "tensorboard"))
  resumed = stream.MetricsStream(folder, start=2, report_to="none")
  resumed.write(3, {"train/loss": 0.125})
  resumed.close()
  assert [r["step"] for r in stream.read(path)] == [1, 2, 3]
