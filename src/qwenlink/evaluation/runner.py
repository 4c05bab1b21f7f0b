"""Turn a task into loglikelihood requests, score them in one pass, and pick each question's answer.

All subjects' requests go to the scorer together so batching and prefix sharing see everything; the prediction is the
choice with the highest summed log-likelihood (lm-eval's `acc`: numpy argmax, so a tie goes to the first choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from qwenlink.evaluation.harness import LoglikelihoodScorer, Request, Score
from qwenlink.evaluation.report import SubjectScore
from qwenlink.evaluation.tasks import Question, Subject, Task


@dataclass(frozen=True)
class QuestionResult:
    subject: str
    index: int
    source: str
    answer: int
    prediction: int
    logprobs: tuple[float, ...]
    is_greedy: tuple[bool, ...]


def build_requests(task: Task, *, shots: int, limit: Optional[int] = None,
                   chat: Optional[Callable[[str], str]] = None) -> list[tuple[Subject, int, Question, list[Request]]]:
    """(subject, index, question, one request per choice) for the first `limit` questions of each subject.

    With `chat` (a function wrapping a prompt in a chat template) the prompt becomes the user turn and the choices are
    scored as bare labels right after the assistant header; this is qwenlink's convention, not lm-eval's.
    """
    items = []
    for subject in task.subjects:
        fewshot = subject.fewshot[:shots]
        for index, q in enumerate(subject.questions[:limit] if limit is not None else subject.questions):
            context = task.fmt.context(subject.description, fewshot, q)
            continuations = task.fmt.continuations(q)
            if chat is not None:
                context = chat(context)
                continuations = [c[len(task.fmt.target_delimiter):] for c in continuations]
            items.append((subject, index, q, [Request(context, c) for c in continuations]))
    return items


def argmax_first(values: tuple[float, ...]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def run_task(task: Task, scorer: LoglikelihoodScorer, *, shots: int, limit: Optional[int] = None,
             chat: Optional[Callable[[str], str]] = None) -> tuple[list[SubjectScore], list[QuestionResult]]:
    items = build_requests(task, shots=shots, limit=limit, chat=chat)
    flat = [r for *_, reqs in items for r in reqs]
    scores: list[Score] = scorer.loglikelihood(flat)
    results: list[QuestionResult] = []
    pos = 0
    for subject, index, q, reqs in items:
        mine = scores[pos:pos + len(reqs)]
        pos += len(reqs)
        lls = tuple(s.logprob for s in mine)
        results.append(QuestionResult(subject.name, index, q.source, q.answer, argmax_first(lls), lls,
                                      tuple(s.is_greedy for s in mine)))
    per_subject = []
    for subject in task.subjects:
        mine = [r for r in results if r.subject == subject.name]
        per_subject.append(SubjectScore(subject.name, subject.category, len(mine),
                                        sum(r.prediction == r.answer for r in mine), subject.display_name))
    return per_subject, results
