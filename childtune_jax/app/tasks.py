"""The tasks: GLUE's, SNLI and SICK, with their columns, labels and metrics."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Task:
  """A GLUE task: where its columns are in the GLUE TSV layout and how it is scored.

  Attributes:
    name: short name (``"cola"``).
    text_columns: one or two header names (or column indices for header-less files).
    label_column: header name or index of the label.
    labels: the label strings in class order; ``None`` for regression (STS-B).
    metrics: the GLUE metrics, first one is the task's main score.
    folder: folder name in the GLUE layout.
    dev_files: evaluation files, one per reported split.
    header: whether the TSV files start with a header row.
    hf_columns: text columns of the HF ``datasets`` copy of the task.
    label_map: other spellings of the labels in the files (matched after lower-casing).
    unlabeled: label values that mark a pair without a gold label: skipped, with a count.
    quoted: whether fields may be CSV-quoted (``"..."``); GLUE's TSV files are not.
    split_column: for a corpus in one file (``single_file``), the column naming each row's
      split; the split names are its values, lower-cased.
    single_file: the file holding every split, if the corpus comes as one file.
  """

  name: str
  text_columns: tuple[str | int, ...]
  label_column: str | int
  labels: tuple[str, ...] | None
  metrics: tuple[str, ...]
  folder: str
  dev_files: tuple[str, ...] = ("dev.tsv",)
  header: bool = True
  hf_columns: tuple[str, ...] = ("sentence",)
  label_map: tuple[tuple[str, str], ...] = ()
  unlabeled: tuple[str, ...] = ()
  quoted: bool = False
  split_column: str | None = None
  single_file: str | None = None

  @property
  def num_labels(self) -> int:
    return 1 if self.labels is None else len(self.labels)

  @property
  def is_regression(self) -> bool:
    return self.labels is None


BINARY = ("0", "1")
ENTAIL = ("entailment", "not_entailment")
# Three-way NLI, in SNLI's (and the hub's MNLI's) class order: 0 entailment, 1 neutral,
# 2 contradiction. One table maps both SNLI's numeric labels and SICK's upper-case names,
# so that a model trained on one is scored on the other class for class.
NLI = ("entailment", "neutral", "contradiction")
NLI_LABELS = (("0", "entailment"), ("1", "neutral"), ("2", "contradiction"),
              ("entailment", "entailment"), ("neutral", "neutral"),
              ("contradiction", "contradiction"))
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("cola", (3,), 1, BINARY, ("matthews",), "CoLA", header=False),
        Task("sst2", ("sentence",), "label", BINARY, ("accuracy",), "SST-2"),
        Task("mrpc", ("#1 String", "#2 String"), "Quality", BINARY, ("f1", "accuracy"), "MRPC",
             hf_columns=("sentence1", "sentence2")),
        Task("stsb", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman"), "STS-B",
             hf_columns=("sentence1", "sentence2")),
        Task("qqp", ("question1", "question2"), "is_duplicate", BINARY, ("f1", "accuracy"), "QQP",
             hf_columns=("question1", "question2")),
        Task("mnli", ("sentence1", "sentence2"), "gold_label",
             ("contradiction", "entailment", "neutral"), ("accuracy",), "MNLI",
             dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
             hf_columns=("premise", "hypothesis")),
        Task("qnli", ("question", "sentence"), "label", ENTAIL, ("accuracy",), "QNLI",
             hf_columns=("question", "sentence")),
        Task("rte", ("sentence1", "sentence2"), "label", ENTAIL, ("accuracy",), "RTE",
             hf_columns=("sentence1", "sentence2")),
        Task("wnli", ("sentence1", "sentence2"), "label", BINARY, ("accuracy",), "WNLI",
             hf_columns=("sentence1", "sentence2")),
        # SNLI as the hub's copy writes it out: train/validation/test.tsv, CSV-quoted,
        # -1 where the annotators agreed on no gold label.
        Task("snli", ("premise", "hypothesis"), "label", NLI, ("accuracy",), "SNLI",
             dev_files=("validation.tsv",), hf_columns=("premise", "hypothesis"),
             label_map=NLI_LABELS, unlabeled=("-1", "-"), quoted=True),
        # SICK (SemEval 2014 task 1) as distributed: one CRLF file, its parts in SemEval_set.
        Task("sick", ("sentence_A", "sentence_B"), "entailment_label", NLI, ("accuracy",),
             "SICK", dev_files=("trial", "test"), label_map=NLI_LABELS,
             split_column="SemEval_set", single_file="SICK.txt"),
    ]
}


def eval_split_names(task: Task) -> list[str]:
  """The task's evaluation splits, by name (``dev``; ``dev_matched``, ...; SICK's ``test``)."""
  return [os.path.splitext(f)[0] for f in task.dev_files]
