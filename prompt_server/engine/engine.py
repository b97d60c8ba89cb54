"""The engine: one thread owns the model and runs schedule -> execute -> update, admitting requests every step."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time

import torch

from prompt_server.adapters.types import SoftPrompt
from prompt_server.engine.batch import RunningBatch, spare_for
from prompt_server.engine.classify import ClassifyJob, plan_labels
from prompt_server.engine.sequence import Detokenizer, RequestHandle, Sequence
from prompt_server.engine.types import (
    AdapterNotFound,
    ClassifyRequest,
    EngineStopped,
    GenerateRequest,
    InvalidRequest,
    Prediction,
    QueueFull,
    Token,
)
from prompt_server.engine.validation import check_generate
from prompt_server.model.batch import PrefillRow, build_prefill
from prompt_server.model.forward import make_runner
from prompt_server.model.sampling import RowSampler, choose, token_logprobs

log = logging.getLogger("prompt_server.engine")

# Padded tokens one prefill may run at once; newcomers beyond it wait for the next step.
MAX_PREFILL_TOKENS = 8192


class Engine:
    """Owns the model. Routes call submit()/classify() from the event loop; everything else runs on one thread."""

    def __init__(self, loaded, registry, settings, fast: bool = True):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.registry = registry
        self.settings = settings
        self.device = loaded.device
        self.runner = make_runner(loaded.model, fast=fast)
        cfg = loaded.model.config
        self.max_position = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1 << 30)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(loaded)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._batch: RunningBatch | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ready = False
        self._stats = collections.Counter()

    # ---- caller side (event loop thread) -------------------------------------------------------------------
    def start(self) -> None:
        self.warmup()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prompt-server-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def warmup(self) -> None:
        """One prefill of a full-width batch and one decode step, so first requests do not pay one-off costs."""
        rows = [PrefillRow(ids=[self.pad_id] * 4) for _ in range(self.settings.max_batch_size)]
        with torch.inference_mode():
            inputs = build_prefill(rows, self.pad_id, self.device)
            hidden, kv = self.runner.prefill(inputs, spare=1)
            self.runner.logits(hidden[:, -1])
            mask = torch.cat([inputs.mask, inputs.mask.new_ones(len(rows), 1)], dim=1)
            ids = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=self.device)
            self.runner.logits(self.runner.decode(ids, kv, mask, inputs.positions[:, -1] + 1))

    def stop(self) -> None:
        self.ready = False
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _adapter(self, adapter_id: str | None) -> SoftPrompt | None:
        if not adapter_id:
            return None
        adapter = self.registry.get(adapter_id)
        if adapter is None:
            raise AdapterNotFound(adapter_id)
        return adapter

    def _enqueue(self, item) -> None:
        with self._cond:
            if not self.ready or self._stopping:
                raise EngineStopped("the engine is not running")
            if len(self._waiting) >= self.settings.max_queue:
                raise QueueFull(retry_after=1.0)
            self._waiting.append(item)
            self._cond.notify_all()

    def submit(self, req: GenerateRequest) -> RequestHandle:
        """Validate and queue a generation; the adapter version is pinned now."""
        if not self.ready:
            raise EngineStopped("the engine is not running")
        adapter = self._adapter(req.adapter_id)
        if adapter is not None and adapter.task_type == "SEQ_CLS":
            raise InvalidRequest(f"adapter_id: '{adapter.id}' is a SEQ_CLS adapter; use /classify with it")
        ids = self._encode(req.prompt, req.add_special_tokens)
        soft = 0 if adapter is None else adapter.num_virtual_tokens
        check_generate(req, len(ids), soft, self.settings, self.max_position)
        handle = RequestHandle(asyncio.get_running_loop(), len(ids), self._wake)
        seq = Sequence(
            handle=handle,
            request=req,
            prompt_ids=ids,
            adapter=adapter,
            sampler=RowSampler.create(req.sampling, self.device),
            eos_ids=self.eos_ids,
            detok=Detokenizer(self.tokenizer),
            special_ids=self.special_ids,
            max_position=self.max_position,
            deadline=time.monotonic() + self.settings.request_timeout,
        )
        self._enqueue(seq)
        self._stats["requests"] += 1
        return handle

    async def classify(self, req: ClassifyRequest) -> list[Prediction]:
        """Score every input; batched with whatever else is running."""
        if not self.ready:
            raise EngineStopped("the engine is not running")
        if not req.inputs:
            raise InvalidRequest("inputs: at least one input is needed")
        if len(req.inputs) > self.settings.max_batch_size:
            raise InvalidRequest(
                f"inputs: {len(req.inputs)} inputs exceed max_batch_size {self.settings.max_batch_size}"
            )
        adapter = self._adapter(req.adapter_id)
        labels, label_ids = plan_labels(adapter, req.labels, self.tokenizer)
        inputs = []
        for i, text in enumerate(req.inputs):
            ids = self._encode(text.rstrip(), True)
            longest = max((len(x) for x in label_ids), default=0) if label_ids else 0
            if len(ids) + longest > self.settings.max_input_tokens:
                raise InvalidRequest(
                    f"inputs[{i}]: {len(ids) + longest} tokens exceed max_input_tokens {self.settings.max_input_tokens}"
                )
            inputs.append(ids)
        loop = asyncio.get_running_loop()
        job = ClassifyJob(loop, loop.create_future(), inputs, adapter, labels, label_ids)
        self._enqueue(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def _encode(self, prompt: str | list[int], special: bool) -> list[int]:
        if isinstance(prompt, list):
            ids = list(prompt)
            bad = [t for t in ids if not (0 <= t < self.loaded.spec.vocab_size)]
            if bad:
                raise InvalidRequest(f"inputs: token id {bad[0]} is outside the vocabulary (0..{self.loaded.spec.vocab_size - 1})")
        else:
            ids = self.tokenizer(prompt, add_special_tokens=special).input_ids
        if not ids:
            raise InvalidRequest("inputs: must not be empty")
        return ids

    def stats(self) -> dict[str, float]:
        with self._cond:
            waiting = len(self._waiting)
        batch = self._batch
        return {
            "queue_depth": waiting,
            "running": 0 if batch is None else len(batch),
            **{k: float(v) for k, v in self._stats.items()},
        }

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and self._batch is None:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failed step must not kill the loop: fail its rows, keep serving
                log.exception("engine step failed")
                self._fail_all(exc)
        self._fail_all(EngineStopped("the engine stopped"))

    def _fail_all(self, exc: BaseException) -> None:
        rows = [] if self._batch is None else self._batch.rows
        self._batch = None
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        for item in rows + pending:
            if isinstance(item, ClassifyJob):
                item.resolve(EngineStopped(str(exc)) if not isinstance(exc, EngineStopped) else exc)
            else:
                item.handle.push(EngineStopped(f"generation failed: {exc}"))

    def _step(self) -> None:
        self._drop_cancelled()
        seqs, jobs = self._schedule()
        for job in jobs:
            self._classify(job)
        if seqs:
            self._admit(seqs)
        if self._batch is not None:
            self._decode()

    def _schedule(self) -> tuple[list[Sequence], list[ClassifyJob]]:
        """Take waiting requests that fit the batch-size, token and prefill limits, in arrival order."""
        batch = self._batch
        size = 0 if batch is None else len(batch)
        tokens = 0 if batch is None else sum(r.budget for r in batch.rows)
        seqs: list[Sequence] = []
        jobs: list[ClassifyJob] = []
        longest = 0
        with self._cond:
            while self._waiting:
                item = self._waiting[0]
                if isinstance(item, ClassifyJob):
                    if not jobs and not item.cancelled:
                        jobs.append(item)
                    elif not item.cancelled:
                        break
                    self._waiting.popleft()
                    continue
                if item.handle.cancelled:
                    self._waiting.popleft()
                    item.finish("cancelled")
                    continue
                fits = size + 1 <= self.settings.max_batch_size and tokens + item.budget <= self.settings.max_batch_tokens
                padded = max(longest, item.embed_len) * (len(seqs) + 1)
                if not fits or (seqs and padded > MAX_PREFILL_TOKENS):
                    break
                self._waiting.popleft()
                seqs.append(item)
                size += 1
                tokens += item.budget
                longest = max(longest, item.embed_len)
        return seqs, jobs

    def _classify(self, job: ClassifyJob) -> None:
        try:
            rows = job.build_rows()
            inputs = build_prefill(rows, self.pad_id, self.device)
            hidden, _ = self.runner.prefill(inputs, spare=0)
            job.resolve(job.score(hidden, self.runner.logits))
            self._stats["classified"] += len(job.inputs)
        except Exception as exc:
            log.exception("classification failed")
            job.resolve(InvalidRequest(f"classification failed: {exc}"))

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefill newcomers in groups of similar length, choose their first tokens, merge them into the batch."""
        now = time.monotonic()
        for s in seqs:
            s.admitted_at = now
        parts = [self._prefill(group) for group in length_groups(seqs)]
        parts = [p for p in parts if p is not None]
        if self._batch is not None:
            parts.insert(0, self._batch)
        self._batch = RunningBatch.concatenate(parts) if parts else None

    def _prefill(self, seqs: list[Sequence]) -> RunningBatch | None:
        rows = []
        for s in seqs:
            a = s.adapter
            rows.append(
                PrefillRow(
                    ids=s.prompt_ids,
                    virtual=None if a is None else a.virtual_tokens,
                    prefix=None if a is None else a.prefix,
                    n_logits=len(s.prompt_ids) if s.request.prefill_logprobs else 1,
                )
            )
        inputs = build_prefill(rows, self.pad_id, self.device)
        hidden, kv = self.runner.prefill(inputs, spare=spare_for(seqs))
        logits = self.runner.logits(hidden[:, -1])  # [n, vocab]
        for i, s in enumerate(seqs):
            if s.request.prefill_logprobs:
                s.prefill = self._prefill_tokens(s, hidden[i, -len(s.prompt_ids) :])
        self._stats["prompt_tokens"] += sum(len(s.prompt_ids) for s in seqs)
        new = RunningBatch(
            rows=seqs,
            kv=kv,
            mask=inputs.mask,
            positions=inputs.positions[:, -1] + 1,
            next_ids=torch.zeros(len(seqs), dtype=torch.long, device=self.device),
        )
        return self._emit(new, logits)

    def _prefill_tokens(self, s: Sequence, hidden: torch.Tensor) -> list[Token]:
        """Prompt tokens with the logprob the model gave each (the first has none)."""
        ids = s.prompt_ids
        logp = self.runner.logits(hidden[:-1]).log_softmax(-1)  # [T-1, vocab]
        picked = logp.gather(-1, torch.tensor(ids[1:], device=logp.device)[:, None]).squeeze(-1).tolist()
        toks = [Token(id=ids[0], text=self.tokenizer.decode([ids[0]]), logprob=math.nan, special=ids[0] in self.special_ids)]
        for t, lp in zip(ids[1:], picked):
            toks.append(Token(id=t, text=self.tokenizer.decode([t]), logprob=lp, special=t in self.special_ids))
        return toks

    def _decode(self) -> None:
        batch = self._batch
        assert batch is not None
        b = len(batch)
        mask = torch.cat([batch.mask, batch.mask.new_ones(b, 1)], dim=1)  # [B, W+1]
        hidden = self.runner.decode(batch.next_ids, batch.kv, mask, batch.positions)  # [B, hidden]
        batch.mask = mask
        batch.positions = batch.positions + 1
        self._stats["steps"] += 1
        self._stats["batch_size_sum"] += b
        self._batch = self._emit(batch, self.runner.logits(hidden))

    def _emit(self, batch: RunningBatch, logits: torch.Tensor) -> RunningBatch | None:
        """Choose a token for every row, hand it to the caller, and drop finished or abandoned rows."""
        rows = batch.rows
        samplers = [r.sampler for r in rows]
        history = [
            torch.tensor(r.history(), device=logits.device) if r.sampler.repetition_penalty != 1.0 else None
            for r in rows
        ]
        ids = choose(logits, samplers, history)
        logprobs = token_logprobs(logits, ids).tolist()
        id_list = ids.tolist()
        positions = batch.positions.tolist()
        now = time.monotonic()
        keep = []
        for i, r in enumerate(rows):
            if r.handle.cancelled:
                r.finish("cancelled")
                continue
            r.append(id_list[i], logprobs[i], self.tokenizer, positions[i], now)
            if r.finish_reason is not None:
                r.finish()
                self._stats["finished"] += 1
            else:
                keep.append(i)
        self._stats["generated_tokens"] += len(rows)
        batch.next_ids = ids
        return batch.filter(keep)

    def _drop_cancelled(self) -> None:
        batch = self._batch
        if batch is None:
            return
        keep = [i for i, r in enumerate(batch.rows) if not r.handle.cancelled]
        if len(keep) < len(batch):
            for r in batch.rows:
                if r.handle.cancelled:
                    r.finish("cancelled")
            self._batch = batch.filter(keep)


def length_groups(seqs: list[Sequence], slack: float = 1.25, floor: int = 16) -> list[list[Sequence]]:
    """Split newcomers into groups whose lengths differ little, so a prefill pads little; shortest first."""
    ordered = sorted(seqs, key=lambda s: s.embed_len)
    groups: list[list[Sequence]] = []
    for s in ordered:
        if groups and s.embed_len <= max(floor, slack * groups[-1][0].embed_len):
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def _eos_ids(loaded) -> frozenset[int]:
    ids: set[int] = set()
    for src in (loaded.model.config, getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
