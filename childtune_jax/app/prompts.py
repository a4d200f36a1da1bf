"""Tasks as instructions and answers: the prompt each classification task is rendered with,
and the answer word of each of its classes (its verbalizer).

``childtune sft --task snli`` trains on ``(prompt, answer)`` pairs rendered from these, in
the model's chat template where it has one; ``--eval-task`` scores another task zero-shot by
the likelihood of each class's answer, as lm-evaluation-harness scores multiple choice.
"""

from __future__ import annotations

import dataclasses

from childtune_jax.app.errors import UsageError
from childtune_jax.app.tasks import TASKS, Task


@dataclasses.dataclass(frozen=True)
class Template:
  """How one task reads as an instruction.

  Attributes:
    prompt: the instruction, with ``{0}`` (and ``{1}``) for the example's text fields.
    answers: the answer of each class, in the task's class order.
  """

  prompt: str
  answers: tuple[str, ...]

  def render(self, texts: list[str]) -> str:
    return self.prompt.format(*(t.strip() for t in texts))


_NLI = Template("Premise: {0}\nHypothesis: {1}\nDoes the premise entail the hypothesis, "
                "contradict it, or neither? Answer with one word: entailment, neutral or "
                "contradiction.", ("entailment", "neutral", "contradiction"))
TEMPLATES: dict[str, Template] = {
    "snli": _NLI,
    "sick": _NLI,
    "mnli": Template(_NLI.prompt, ("contradiction", "entailment", "neutral")),  # MNLI's order
    "rte": Template("Sentence 1: {0}\nSentence 2: {1}\nDoes sentence 1 entail sentence 2? "
                    "Answer yes or no.", ("yes", "no")),
    "qnli": Template("Question: {0}\nSentence: {1}\nDoes the sentence answer the question? "
                     "Answer yes or no.", ("yes", "no")),
    "wnli": Template("Sentence 1: {0}\nSentence 2: {1}\nDoes sentence 1 entail sentence 2? "
                     "Answer yes or no.", ("no", "yes")),
    "sst2": Template("Review: {0}\nIs the sentiment of this review positive or negative? "
                     "Answer with one word.", ("negative", "positive")),
    "cola": Template("Sentence: {0}\nIs this sentence grammatically acceptable English? "
                     "Answer yes or no.", ("no", "yes")),
    "mrpc": Template("Sentence 1: {0}\nSentence 2: {1}\nDo the two sentences mean the same "
                     "thing? Answer yes or no.", ("no", "yes")),
    "qqp": Template("Question 1: {0}\nQuestion 2: {1}\nDo the two questions ask the same thing? "
                    "Answer yes or no.", ("no", "yes")),
}


def template(name: str) -> tuple[Task, Template]:
  """The task and its template; a task without one (STS-B's scores) is refused."""
  task = TASKS.get(name)
  if task is None:
    raise UsageError(f"unknown task {name!r} (one of {', '.join(sorted(TASKS))})")
  if name not in TEMPLATES:
    raise UsageError(f"{name} has no instruction template (its labels are scores); give your "
                     "own prompt-response files instead")
  t = TEMPLATES[name]
  if len(t.answers) != task.num_labels:
    raise UsageError(f"{name}'s template has {len(t.answers)} answers for {task.num_labels} "
                     "classes")
  return task, t
