"""A run's metrics as it trains: per step and per evaluation, to JSON lines and TensorBoard.

Every seed's folder gets ``metrics.jsonl``, one JSON object a line (``{"step": 12,
"train/loss": 0.71, "train/learning_rate": 1e-4, ...}``), written whole and flushed line by
line, so that a crash leaves it readable up to its last line; with ``--report-to
tensorboard`` (the default where ``tensorboardX`` is installed, with the ``cli`` extra) the
same scalars go to TensorBoard event files in ``tensorboard/``. A resumed run continues the
stream: the lines past its checkpoint are dropped (they are trained again), and TensorBoard
is told to purge them, in an event file of the resume's own. Process 0 alone writes.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Any

from childtune_jax.app import files

logger = logging.getLogger(__name__)

JSONL = files.METRICS_FILE
TENSORBOARD = files.TENSORBOARD_DIR
REPORT_TO = ("auto", "tensorboard", "none")


def tensorboard_available() -> bool:
  return importlib.util.find_spec("tensorboardX") is not None


def read(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` (a last line cut short by a crash is left out)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return out


class EventFile:
  """A TensorBoard event file written synchronously: each step's scalars are on disk when
  :meth:`scalars` returns, as its JSON line is (tensorboardX's ``SummaryWriter`` queues
  them for a thread, so a crash loses the last ones). Its records are tensorboardX's.

  A file of its own for each start: a run resumed at step ``start`` begins its file with
  the event that tells TensorBoard to drop every earlier file's events at later steps
  (a ``SessionLog.START`` at ``start + 1``, what ``SummaryWriter(purge_step=...)`` writes).
  """

  def __init__(self, folder: str, *, start: int):
    import socket
    import time

    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import RecordWriter

    self._pb, self._time = event_pb2, time.time
    os.makedirs(folder, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.from-{start}")
    self._file = RecordWriter(os.path.join(folder, name))
    self._put(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    if start:
      self._put(event_pb2.Event(wall_time=time.time(), step=start + 1,
                                session_log=event_pb2.SessionLog(
                                    status=event_pb2.SessionLog.START)))
    self._file.flush()

  def _put(self, event: Any) -> None:
    self._file.write(event.SerializeToString())

  def scalars(self, step: int, values: dict[str, float]) -> None:
    from tensorboardX.proto import summary_pb2

    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v)
                                         for k, v in values.items()])
    self._put(self._pb.Event(wall_time=self._time(), step=step, summary=summary))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsStream:
  """The metrics of one seed's run, from step ``start`` on.

  Args:
    folder: the seed's folder.
    start: the step the run starts (or resumes) at: earlier records are kept, later dropped.
    report_to: ``"tensorboard"``, ``"none"``, or ``"auto"`` (TensorBoard where installed).
    primary: whether this process writes (process 0).
  """

  def __init__(self, folder: str, *, start: int, report_to: str = "auto",
               primary: bool = True):
    self.primary = primary
    self.path = os.path.join(folder, JSONL)
    self.writer = None
    if not primary:
      return
    os.makedirs(folder, exist_ok=True)
    kept = [r for r in read(self.path) if r.get("step", 0) <= start]
    files.write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
    use_tb = report_to == "tensorboard" or (report_to == "auto" and tensorboard_available())
    if report_to == "tensorboard" and not tensorboard_available():
      raise ImportError("--report-to tensorboard needs tensorboardX: pip install tensorboardX")
    if use_tb:
      self.writer = EventFile(os.path.join(folder, TENSORBOARD), start=start)

  def write(self, step: int, values: dict[str, float]) -> None:
    """One step's scalars (non-finite ones as ``null`` in the JSON, left out of TensorBoard)."""
    if not self.primary or not values:
      return
    clean = {k: (float(v) if v is not None and math.isfinite(float(v)) else None)
             for k, v in values.items()}
    self.file.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
    self.file.flush()
    if self.writer is not None:
      self.writer.scalars(step, {k: v for k, v in clean.items() if v is not None})

  def evaluation(self, step: int, metrics: dict[str, Any]) -> None:
    """An evaluation's metrics, ``{split: {metric: value}}`` or ``{name: value}``, as
    ``eval/<split>/<metric>``."""
    flat: dict[str, float] = {}
    for split, values in metrics.items():
      if isinstance(values, dict):
        for name, value in values.items():
          flat[f"eval/{split}/{name}"] = value
      else:
        flat[f"eval/{split}"] = values
    self.write(step, flat)

  def close(self) -> None:
    if not self.primary:
      return
    self.file.close()
    if self.writer is not None:
      self.writer.close()
