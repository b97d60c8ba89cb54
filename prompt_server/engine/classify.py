"""Classification through the engine: a classifier head on the last hidden state, or labels scored as continuations."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch

from prompt_server.adapters.types import SEQ2SEQ, SoftPrompt
from prompt_server.engine.batch import prefill_chunks
from prompt_server.engine.types import GenerationFailed, InvalidRequest, Prediction
from prompt_server.model.batch import PrefillRow, build_prefill

log = logging.getLogger("prompt_server.engine")


@dataclass
class ClassifyJob:
    """All rows of one /classify call; finished in the prefill that admits it."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    inputs: list[list[int]]  # token ids per input
    adapter: SoftPrompt | None
    labels: list[str]
    label_ids: list[list[int]] | None  # verbalizer tokens per label; None when the adapter's head is used
    cancelled: bool = False
    multi_label: bool = False  # a head's scores are independent (sigmoid), as the model's problem_type says

    def build_rows(self, virtual: torch.Tensor | None, prefix: torch.Tensor | None) -> list[PrefillRow]:
        """Rows for every input (and label), each with the adapter's virtual tokens or its keys/values."""
        rows = []
        for ids in self.inputs:
            if self.label_ids is None:
                rows.append(PrefillRow(ids=ids, virtual=virtual, prefix=prefix))
                continue
            for lab in self.label_ids:
                rows.append(PrefillRow(ids=ids + lab, virtual=virtual, prefix=prefix))
        return rows

    def predictions(self, scores: torch.Tensor) -> list[Prediction]:
        """Head scores [inputs, labels] -> one prediction per input."""
        return [_prediction(self.labels, row.float(), self.multi_label) for row in scores]

    def score(self, hidden: list[torch.Tensor], logits_fn) -> list[Prediction]:
        """hidden[i]: [S_i, hidden] of row i, right-aligned -> one prediction per input."""
        if self.label_ids is None:
            head = None if self.adapter is None else self.adapter.classifier
            assert head is not None  # plan_labels chose the head: the adapter has one
            h = torch.stack([x[-1] for x in hidden]).to(head.weight.dtype)  # [n, hidden]
            scores = h @ head.weight.T  # [n, labels]
            if head.bias is not None:
                scores = scores + head.bias
            return self.predictions(scores)
        preds = []
        n_labels = len(self.label_ids)
        for i in range(len(self.inputs)):
            totals = []
            for j, lab in enumerate(self.label_ids):
                row = i * n_labels + j
                k = len(lab)
                # position j scores the token at j+1: the k label tokens are scored by the k positions before them
                logp = logits_fn(hidden[row][-(k + 1) : -1]).log_softmax(-1)  # [k, vocab]
                totals.append(logp.gather(-1, torch.tensor(lab, device=logp.device)[:, None]).sum())
            preds.append(_prediction(self.labels, torch.stack(totals)))
        return preds

    def resolve(self, predictions: list[Prediction] | BaseException) -> None:
        def set_result() -> None:
            if self.future.done():
                return
            if isinstance(predictions, BaseException):
                self.future.set_exception(predictions)
            else:
                self.future.set_result(predictions)

        self.loop.call_soon_threadsafe(set_result)


def _prediction(labels: list[str], scores: torch.Tensor, multi_label: bool = False) -> Prediction:
    """Scores -> probabilities: across the labels (softmax), or each label on its own (sigmoid) for a multi-label
    head; the label is the most probable."""
    probs = (scores.float().sigmoid() if multi_label else scores.float().softmax(-1)).tolist()
    best = max(range(len(labels)), key=lambda i: probs[i])
    return Prediction(label=labels[best], score=probs[best], scores=dict(zip(labels, probs)))


def plan_labels(adapter: SoftPrompt | None, labels: list[str] | None, tokenizer,
                base_labels: tuple[str, ...] | None = None) -> tuple[list[str], list | None]:
    """Decide head or verbalizers; -> (label names, verbalizer token ids or None for the head). The request's
    labels were checked already (engine/validation.py check_classify).

    base_labels: the model's own head's labels when it has one (encoder classifiers), used without an adapter.
    """
    head = adapter.classifier if adapter is not None else None
    if head is not None or (adapter is None and base_labels is not None):
        whose = "the adapter's" if head is not None else "the model's"
        default: tuple[str, ...] | list[str]
        if adapter is not None and head is not None:
            default = adapter.labels or [f"LABEL_{i}" for i in range(head.num_labels)]
        else:
            assert base_labels is not None
            default = base_labels
        n = len(default)
        names = list(labels) if labels else list(default)
        if len(names) != n:
            raise InvalidRequest(f"labels: {whose} classifier head has {n} outputs, got {len(names)} labels")
        return names, None
    names = list(labels) if labels else list(adapter.labels or []) if adapter is not None else []
    if len(names) < 2:
        raise InvalidRequest("labels: at least 2 labels are needed to score as continuations, got " + str(len(names)))
    ids = []
    for name in names:
        if not name.strip():
            raise InvalidRequest("labels: a label must not be blank")
        tok = tokenizer(" " + name.strip(), add_special_tokens=False).input_ids
        ids.append(tok)
    return names, ids


class Classifier:
    """Runs /classify jobs on the engine thread, each family its way: an encoder classifier's jobs of any adapters
    in one forward through its head; a causal LM's labels scored as continuations (or its SEQ_CLS head on the last
    token); an encoder-decoder's labels scored by its decoder. A job that fails fails alone."""

    def __init__(self, runner, layout, pad_id: int, device: torch.device, count):
        self.runner = runner
        self.layout = layout
        self.pad_id = pad_id
        self.device = device
        self.count = count  # the engine's counters

    def run(self, jobs: list[ClassifyJob]) -> None:
        if not self.runner.generates:
            self._together(jobs)
            return
        for job in jobs:
            if self.runner.family == SEQ2SEQ:
                self._seq2seq(job)
            else:
                self._causal(job)

    def _causal(self, job: ClassifyJob) -> None:
        """Labels scored as continuations by a causal LM, or its SEQ_CLS head on the last token."""
        try:
            rows = job.build_rows(*self.layout.soft([job.adapter])[0])
            hidden = []
            for chunk in prefill_chunks(rows):
                h, _ = self.runner.prefill(build_prefill(chunk, self.pad_id, self.device), spare=0)
                hidden.extend(h.unbind(0))  # rows keep their own right-aligned [S, hidden]
            job.resolve(job.score(hidden, self.runner.logits))
            self.count("classified", len(job.inputs))
        except Exception as exc:  # this job fails alone
            log.exception("classification failed")
            job.resolve(GenerationFailed(f"classification failed: {exc}"))

    def _seq2seq(self, job: ClassifyJob) -> None:
        """Verbalizer labels scored by an encoder-decoder model: each input through the encoder once, each label
        through the decoder after the start token."""
        try:
            a = job.adapter
            rows = [PrefillRow(ids=ids, virtual=None if a is None else a.virtual_tokens,
                               prefix=None if a is None else a.prefix) for ids in job.inputs]
            scores = torch.cat([self.runner.label_scores(chunk, job.label_ids, self.pad_id, self.device)
                                for chunk in prefill_chunks(rows)])
            job.resolve(job.predictions(scores))
            self.count("classified", len(job.inputs))
        except Exception as exc:  # this job fails alone
            log.exception("classification failed")
            job.resolve(GenerationFailed(f"classification failed: {exc}"))

    def _together(self, jobs: list[ClassifyJob]) -> None:
        """Jobs of any adapters (an encoder classifier's) in one forward; a failure is retried job by job, so
        only the job that fails fails."""
        try:
            self._rows(jobs)
        except Exception:
            log.info("classification batch failed; running its jobs one at a time", exc_info=True)
            for job in jobs:
                try:
                    self._rows([job])
                except Exception as exc:
                    log.exception("classification failed")
                    job.resolve(GenerationFailed(f"classification failed: {exc}"))

    def _rows(self, jobs: list[ClassifyJob]) -> None:
        rows: list[PrefillRow] = []
        spans: list[tuple[int, int]] = []
        for job in jobs:
            a = job.adapter
            job_rows = job.build_rows(None if a is None else a.virtual_tokens, None if a is None else a.prefix)
            spans.append((len(rows), len(rows) + len(job_rows)))
            rows += job_rows
        pooled = torch.cat([self.runner.hidden(chunk) for chunk in prefill_chunks(rows)])
        results = []
        for job, (lo, hi) in zip(jobs, spans):
            head = None if job.adapter is None or job.adapter.classifier is None else job.adapter.classifier.params
            results.append(job.predictions(self.runner.scores(pooled[lo:hi], head)))
        for job, predictions in zip(jobs, results):
            job.resolve(predictions)
            self.count("classified", len(job.inputs))
