"""The engine: one thread owns the model and runs schedule -> execute -> update, admitting requests every step."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time

import torch

from prompt_server.adapters.types import FAMILY_NAMES, SEQ2SEQ, SoftPrompt
from prompt_server.engine.admission import Layout, Prepared
from prompt_server.engine.batch import RunningBatch, grown_slots, length_groups, spare_for
from prompt_server.engine.classify import Classifier, ClassifyJob, plan_labels
from prompt_server.engine.prefix_cache import PrefixCache
from prompt_server.engine.prompt_kv import PromptKVCache
from prompt_server.engine.scheduler import Scheduler
from prompt_server.engine.sequence import Detokenizer, RequestHandle, Sequence
from prompt_server.engine.types import (
    CANCELLED,
    TIMEOUT,
    AdapterNotFound,
    ClassifyRequest,
    EngineStopped,
    GenerateRequest,
    GenerationFailed,
    InvalidRequest,
    NotServed,
    Prediction,
    QueueFull,
    Token,
)
from prompt_server.engine.validation import (
    check_classify,
    check_classify_lengths,
    check_generate,
    check_request,
    check_seq2seq_classify,
    check_seq2seq_lengths,
)
from prompt_server.model import omp
from prompt_server.model.batch import PrefillInputs, PrefillRow, build_prefill
from prompt_server.model.compat import UNBOUNDED_POSITIONS
from prompt_server.model.forward import DecodeInputs, make_runner
from prompt_server.model.sampling import RowSampler, choose, token_logprobs

log = logging.getLogger("prompt_server.engine")

# Prompt positions whose full-vocabulary logprobs are held at once (decoder_input_details).
LOGPROB_CHUNK = 128
# Steps and their wall time, by kind (Engine._count_step); exported from the start
STEP_TIME_STATS = ("prefill_steps", "prefill_step_seconds", "decode_only_steps", "decode_only_step_seconds")


class Engine:
    """Owns the model. Routes call submit()/classify() from the event loop; everything else runs on one thread."""

    def __init__(self, loaded, registry, settings, fast: bool = True):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.model_id
        self.registry = registry
        self.settings = settings
        self.device = loaded.device
        # compiled only as the plan was proven (model/loader.py), and never the generic path that `fast=False` asks for
        self.runner = make_runner(loaded.model, loaded.plan.forward_path if fast else "generic",
                                  compiled=fast and loaded.plan.compiled, native=fast and loaded.plan.native_kernels,
                                  graphs=fast and loaded.plan.cuda_graphs)
        self.max_position = loaded.plan.max_position
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(loaded)
        self.special_ids = frozenset(self.tokenizer.all_special_ids)
        self.family = self.runner.family
        # heads trained for multi-label classification score each label on its own (transformers' problem_type)
        self._multi_label = getattr(loaded.model.config, "problem_type", None) == "multi_label_classification"
        self.prompt_kv: PromptKVCache | None = None
        # soft-prompt and prefix caching hold keys/values that only causal attention makes reusable
        causal = self.runner.caches_prompts
        if causal and settings.prompt_kv_cache_bytes > 0:
            pinned = frozenset(a.strip() for a in settings.pinned_adapters.split(",") if a.strip())
            self.prompt_kv = PromptKVCache(self.runner, self.pad_id, self.device, settings.prompt_kv_cache_bytes,
                                           pinned)
        self.prefix_cache = PrefixCache(settings.prefix_cache_bytes) if causal and settings.prefix_cache_bytes else None
        build = self.runner.build_prefill if self.runner.generates else build_prefill  # classifiers never prefill
        # classifiers' runners decode nothing and have no such flag
        self.reads_pieces = bool(getattr(self.runner, "reads_pieces", False))
        self.layout = Layout(self.prompt_kv, self.prefix_cache, self.pad_id, self.device, build,
                             keep_pieces=self.reads_pieces)
        # encoder-decoder models: the prompt goes to the encoder whole, labels are scored by the decoder
        self.seq2seq = self.family == SEQ2SEQ
        self.classifier = Classifier(self.runner, self.layout, self.pad_id, self.device, self._count)
        self._cond = threading.Condition()
        # a fast tokenizer may refuse a call while another thread's call holds it ("Already borrowed")
        self._tokenizer_lock = threading.Lock()
        self._waiting: collections.deque = collections.deque()
        self._batch: RunningBatch | None = None
        self._prefilling: list[Sequence] = []  # admitted rows whose prompt is prefilled in chunks, not yet decoding
        self.scheduler = Scheduler(settings, None if self.prompt_kv is None else self.prompt_kv.holds)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ready = False
        # counters exported from the start, also while they are zero
        self._stats: dict[str, float] = dict.fromkeys(
            ("requests", "steps", "cache_relayouts", *STEP_TIME_STATS), 0.0)

    # ---- caller side (event loop thread) -------------------------------------------------------------------
    def start(self) -> None:
        self.warmup()
        # The engine steps on its own thread: this one's OpenMP workers, idle from now on, would make the engine's
        # sleep between parallel regions (model/omp.py).
        omp.release()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prompt-server-engine", daemon=True)
        self._thread.start()
        self.ready = True

    def warmup(self) -> None:
        """One prefill of a full-width batch and one decode step, so first requests do not pay one-off costs."""
        rows = [PrefillRow(ids=[self.pad_id] * 4) for _ in range(self.settings.max_batch_size)]
        if not self.runner.generates:
            self.runner.scores(self.runner.hidden(rows), None)
            return
        with torch.inference_mode():
            inputs = self.runner.build_prefill(rows, self.pad_id, self.device)
            hidden, kv = self.runner.prefill(inputs, spare=1)
            self.runner.logits(hidden[:, -1])
            mask = torch.cat([inputs.mask, inputs.mask.new_ones(len(rows), 1)], dim=1)
            ids = torch.full((len(rows),), self.pad_id, dtype=torch.long, device=self.device)
            self.runner.logits(self.runner.decode(DecodeInputs(ids, kv, mask, inputs.positions[:, -1] + 1)))

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
                # requests abandoned while waiting do not hold a place
                live = [w for w in self._waiting if not _abandoned(w)]
                if len(live) >= self.settings.max_queue:
                    raise QueueFull(retry_after=1.0)
                for w in self._waiting:
                    if _abandoned(w) and not isinstance(w, ClassifyJob):
                        w.finish(CANCELLED)
                self._waiting = collections.deque(live)
            self._waiting.append(item)
            self._cond.notify_all()

    def check_generates(self) -> None:
        """Raise NotServed when the loaded model's family does not generate text (an encoder classifier)."""
        if not self.runner.generates:
            raise NotServed(
                f"generation: the loaded model {self.model_id} is {FAMILY_NAMES[self.family]} "
                f"({self.loaded.spec.model_type}), which does not generate text; use /classify"
            )

    def submit(self, req: GenerateRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Validate and queue a generation; the adapter version is pinned now. It tokenizes and may read the
        adapter store: call it from a worker thread with the caller's event loop, which receives the events."""
        if not self.ready:
            raise EngineStopped("the engine is not running")
        self.check_generates()
        check_request(req, self.settings)  # before tokenizing
        f = req.fields
        if self.seq2seq and req.prefill_logprobs:
            raise InvalidRequest(
                f"{f.prefill_logprobs}: {self.model_id} is an encoder-decoder model; its prompt goes to the "
                f"encoder, which gives no token logprobs"
            )
        adapter = self._adapter(req.adapter_id)
        if adapter is not None and adapter.task_type == "SEQ_CLS":
            raise InvalidRequest(f"{f.adapter_id}: '{adapter.id}' is a SEQ_CLS adapter; use /classify with it")
        ids = self._encode(req.prompt, req.add_special_tokens, f.prompt)
        if req.truncate is not None:
            ids = ids[-req.truncate :]
        soft = 0 if adapter is None else adapter.num_virtual_tokens
        if self.seq2seq:
            check_seq2seq_lengths(req, len(ids), adapter, self.max_position, self.runner.encoder_context)
        check_generate(req, len(ids), 0 if self.seq2seq else soft, self.settings,
                       self.max_position if not self.seq2seq else UNBOUNDED_POSITIONS)
        handle = RequestHandle(loop or asyncio.get_running_loop(), self._wake)
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
            inline_virtual=self.prompt_kv is None,
            deadline=time.monotonic() + self.settings.request_timeout,
            chunked=not self.seq2seq,
            context=[self.runner.decoder_start] if self.seq2seq else None,
        )
        self._enqueue(seq)
        self._count("requests", 1)
        return handle

    async def classify(self, req: ClassifyRequest) -> list[Prediction]:
        """Score every input; batched with whatever else is running. Tokenizing and the adapter lookup run in a
        worker thread."""
        if not self.ready:
            raise EngineStopped("the engine is not running")
        loop = asyncio.get_running_loop()
        job = await asyncio.to_thread(omp.released(self._classify_job), req, loop, loop.create_future())
        self._enqueue(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    def _classify_job(self, req: ClassifyRequest, loop: asyncio.AbstractEventLoop,
                      future: asyncio.Future) -> ClassifyJob:
        check_classify(req, self.settings)
        adapter = self._adapter(req.adapter_id)
        if adapter is None and not self.runner.generates and not self.loaded.head_trained:
            raise InvalidRequest(
                f"adapter_id: the checkpoint of {self.model_id} has no trained classifier head, so only SEQ_CLS "
                f"adapters classify with it; pass one"
            )
        labels, label_ids = plan_labels(adapter, req.labels, self.tokenizer, self._base_labels())
        soft = 0 if adapter is None else adapter.num_virtual_tokens
        inputs = [self._encode(text.rstrip(), True) for text in req.inputs]
        if self.seq2seq:  # labels are scored by the decoder, inputs read by the encoder
            check_seq2seq_classify(inputs, label_ids, adapter, self.settings, self.max_position,
                                   self.runner.encoder_context)
        else:
            check_classify_lengths(inputs, label_ids, soft, self.settings, self.max_position)
        return ClassifyJob(loop, future, inputs, adapter, labels, label_ids,
                           multi_label=label_ids is None and self._multi_label)

    def _base_labels(self) -> tuple[str, ...] | None:
        """An encoder classifier's own labels (config.id2label), used without an adapter; None for causal LMs,
        which score labels as continuations."""
        if self.runner.generates:
            return None
        config = self.loaded.model.config
        return tuple(config.id2label[i] for i in range(config.num_labels))

    def encode(self, text: str, special: bool) -> list[int]:
        """Token ids of `text`; safe from any thread (one tokenizer call at a time)."""
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=special).input_ids

    def _encode(self, prompt: str | list[int], special: bool, field: str = "inputs") -> list[int]:
        if isinstance(prompt, list):
            ids = list(prompt)
            vocab = self.loaded.spec.vocab_size
            bad = [t for t in ids if not (0 <= t < vocab)]
            if bad:
                raise InvalidRequest(f"{field}: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        else:
            ids = self.encode(prompt, special)
        if not ids:
            raise InvalidRequest(f"{field}: must not be empty")
        return ids

    def stats(self) -> dict[str, float]:
        with self._cond:
            waiting = len(self._waiting)
            counters = {k: float(v) for k, v in self._stats.items()}
        batch = self._batch
        running = (0 if batch is None else len(batch)) + len(self._prefilling)
        out = {"queue_depth": waiting, "running": running, **counters}
        graphs = getattr(self.runner, "graphs", None)
        if graphs is not None:  # model/graphs.py: decode steps replayed, and graphs recorded
            out.update(decode_graph_steps=graphs.replays, decode_graph_captures=graphs.captures)
        if self.prompt_kv is not None:
            kv = self.prompt_kv
            out.update(prompt_kv_hits=kv.stats.hits, prompt_kv_misses=kv.stats.misses,
                       prompt_kv_evictions=kv.stats.evictions, prompt_kv_bytes=kv.bytes)
        if self.prefix_cache is not None:
            pc = self.prefix_cache
            out.update(prefix_cache_hits=pc.stats.hits, prefix_cache_reused_tokens=pc.stats.reused_tokens,
                       prefix_cache_stored=pc.stats.stored, prefix_cache_evictions=pc.stats.evictions,
                       prefix_cache_bytes=pc.bytes)
        return out

    def _count(self, key: str, n: float) -> None:
        with self._cond:
            self._stats[key] = self._stats.get(key, 0.0) + n

    def _count_step(self, kind: str, seconds: float) -> None:
        """A finished step's wall time, its tokens handed out included: `prefill_steps`/`prefill_step_seconds` for
        steps that ran prompt tokens (newcomers' chunks, a classification), with or without the running rows' next
        tokens, `decode_only_*` for the others. A step that fails is not counted. On a GPU, reading the tokens waits
        for the step's kernels; a step that hands out none (a prompt chunk alone) does not wait, and what its kernels
        still had to run falls to the next step's time."""
        with self._cond:
            self._stats[f"{kind}_steps"] += 1
            self._stats[f"{kind}_step_seconds"] += seconds

    # ---- engine thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                idle = not self._stopping and not self._has_work()
            if idle:
                # nothing to step: this thread's OpenMP workers go, so that torch run meanwhile on other threads (an
                # upload's encoder, a caller's own model) is not slowed by their idle pool (model/omp.py); the next
                # step starts a new one, in well under a millisecond
                omp.release()
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                started = time.perf_counter()
                with torch.inference_mode():
                    kind = self._step()
                if kind is not None:  # where the engine's time goes: steps that ran prompts, and decode-only steps
                    self._count_step(kind, time.perf_counter() - started)
            except Exception as exc:  # a failed decode step fails the running rows; the loop and the queue go on
                log.exception("engine step failed")
                rows = [] if self._batch is None else self._batch.sequences()
                self._batch = None
                self._fail(rows, GenerationFailed(f"generation failed: {exc}"))
        rows = ([] if self._batch is None else self._batch.sequences()) + self._prefilling
        self._batch, self._prefilling = None, []
        with self._cond:
            pending = list(self._waiting)
            self._waiting.clear()
        self._fail(rows + pending, EngineStopped("the engine stopped"))

    def _has_work(self) -> bool:
        return bool(self._waiting) or self._batch is not None or bool(self._prefilling)

    def _fail(self, items: list, exc: Exception) -> None:
        for item in items:
            if isinstance(item, ClassifyJob):
                item.resolve(exc)
            else:
                item.handle.push(exc)

    def _step(self) -> str | None:
        """One forward for the running rows' next tokens and the newcomers' prompts, then hand out the tokens.
        -> "prefill" when it ran prompt tokens, "decode_only" when only the running rows', None when nothing."""
        self._drop_cancelled()
        seqs, jobs = self._schedule()
        if jobs:
            self.classifier.run(jobs)
        now = time.monotonic()
        for s in seqs:
            s.admitted_at = s.admitted_at or now  # a row's first chunk admits it
        groups = []
        for similar in length_groups(seqs):  # newcomers in groups of similar length, so a prefill pads little
            try:
                groups.append(self.layout.prepare(similar))
            except Exception:  # e.g. an adapter's soft prompt that cannot be computed: find whose, row by row
                log.info("prefill layout failed; laying out its rows one at a time", exc_info=True)
                for s in similar:
                    try:
                        groups.append(self.layout.prepare([s]))
                    except Exception as exc:
                        log.exception("prefill failed")
                        self._fail_group([s], exc)
        batch = self._batch
        if batch is not None and len(groups) == 1 and self.runner.prefills_with_room:
            self._make_room(batch, groups[0])
        decode = None
        if batch is not None:
            batch.reserve(1)
            slots = batch.slots
            new_column = batch.mask.new_zeros(len(batch.rows), 1)
            new_column[slots] = True  # the token each running row feeds now; free slots stay masked out
            decode = DecodeInputs(
                ids=batch.next_ids[slots],
                kv=batch.kv,
                mask=torch.cat([batch.mask, new_column], dim=1),
                positions=batch.positions[slots],
                slots=None if batch.dense else slots,
                start=batch.start,
                # Layout keeps them for a runner that reads them; the runner may be told not to (an A/B)
                pieces=[[(ref(), n) for ref, n in s.shared] for s in batch.sequences()]
                if self.reads_pieces and self.runner.reads_pieces else None,
            )
        if decode is None and not groups:
            return "prefill" if jobs else None
        try:
            decoded, prefilled = self.runner.step(decode, [(g.inputs, g.spare) for g in groups])
        except Exception:  # find the part that fails, each part alone; the others go on
            log.info("step failed; running its parts one at a time", exc_info=True)
            decoded, prefilled = self._step_apart(decode, groups)
        if batch is not None and decode is not None and decoded is not None:
            batch.mask = decode.mask
            batch.positions += 1
            self._count("steps", 1)
            self._count("batch_size_sum", len(batch))
            self._batch = self._emit(batch, self.runner.logits(decoded))
        parts = []
        for group, out in zip(groups, prefilled):
            if out is None:
                continue
            try:
                part = self._admit(group, *out)
            except Exception as exc:
                log.exception("prefill failed")
                self._fail_group(group.seqs, exc)
                continue
            if part is not None:
                parts.append(part)
        self._join(parts)
        if self._batch is not None and self._batch.relayouts:
            self._count("cache_relayouts", self._batch.relayouts)
            self._batch.relayouts = 0
        return "prefill" if groups or jobs else "decode_only"

    def _make_room(self, batch: RunningBatch, group: Prepared) -> None:
        """When newcomers do not fit the running batch's free slots, its cache would be laid out again and the
        newcomers copied into it. Their prefill gets a cache with room for the running rows instead (free slots,
        and lead columns when the running rows are wider), and the running rows join it after the step
        (_admit_rows): the newcomers' keys/values (soft prompts, cached heads) are written once, where they stay.
        Not when the running rows are much wider than the newcomers: the prefill would attend over their width."""
        n = len(group.seqs)
        if len(batch.rows) - len(batch) >= n or not isinstance(group.inputs, PrefillInputs):
            return
        own = group.inputs.prefix_width + group.inputs.ids.shape[1]
        after = batch.kv.width - batch.start + 1  # the running rows' columns after this step's token
        lead = max(0, after - own)
        if lead > own:
            return
        spare = spare_for(batch.sequences() + group.seqs)
        slots = grown_slots(len(batch) + n, len(batch.rows), max(after, own) + spare, self.settings.max_batch_size,
                            self.settings.max_batch_tokens)
        group.inputs = group.inputs.with_room(slots, lead)
        group.spare = spare

    def _join(self, parts: list[RunningBatch]) -> None:
        """A step's prefilled rows join the running batch; several groups grow it once for all of them. Rows whose
        joining fails (room for them could not be allocated, say) fail as their prefill would; the running rows and
        the loop go on."""
        try:
            if len(parts) > 1:
                if self._batch is None:
                    self._batch, parts = parts[0], parts[1:]
                self._batch.make_room(parts, self.settings.max_batch_size, self.settings.max_batch_tokens)
        except Exception as exc:
            log.exception("making room for newcomers failed")
            for part in parts:
                self._fail_group(part.sequences(), exc)
            return
        for i, part in enumerate(parts):
            try:
                self._admit_rows(part)
            except Exception as exc:
                log.exception("newcomers could not join the running batch")
                for rest in parts[i:]:
                    self._fail_group(rest.sequences(), exc)
                return

    def _admit_rows(self, part: RunningBatch) -> None:
        """Newly prefilled rows join the running batch: into its free slots, or the running rows into theirs when
        the prefill was given room for them (_make_room; RunningBatch.join)."""
        if self._batch is None:
            self._batch = part
            return
        self._batch = self._batch.join(part, self.settings.max_batch_size, self.settings.max_batch_tokens)

    def _step_apart(self, decode: DecodeInputs | None, groups: list[Prepared]):
        """The step again, one part at a time: a failing decode fails the running rows, a failing group its own."""
        decoded = None
        if decode is not None:
            try:
                decoded = self.runner.decode(decode)
            except Exception as exc:
                log.exception("engine step failed")
                rows = [] if self._batch is None else self._batch.sequences()
                self._batch = None
                self._fail(rows, GenerationFailed(f"generation failed: {exc}"))
        prefilled: list[tuple | None] = []
        for group in groups:
            try:
                prefilled.append(self.runner.prefill(group.inputs, group.spare))
            except Exception as exc:
                log.exception("prefill failed")
                self._fail_group(group.seqs, exc)
                prefilled.append(None)
        return decoded, prefilled

    def _fail_group(self, seqs: list[Sequence], exc: Exception) -> None:
        self._prefilling = [s for s in self._prefilling if s not in seqs]
        self._fail([s for s in seqs if s.finish_reason is None], GenerationFailed(f"prefill failed: {exc}"))

    def _schedule(self) -> tuple[list[Sequence], list[ClassifyJob]]:
        batch = self._batch
        running = [] if batch is None else batch.sequences()
        width = 0 if batch is None else batch.kv.width - batch.start
        with self._cond:
            plan = self.scheduler.plan(running, width, self._prefilling, self._waiting, time.monotonic())
        for item, reason in plan.expired:
            item.finish(reason)
        return plan.prefill, plan.classify

    def _admit(self, group: Prepared, hidden: torch.Tensor, kv) -> RunningBatch | None:
        """A prefilled group: rows whose prompt is done choose their first token and form a batch to merge; rows
        with chunks to go keep their keys/values for the next step."""
        seqs, inputs = group.seqs, group.inputs
        done = []
        for i, (s, row, start) in enumerate(zip(seqs, group.rows, group.starts)):
            s.prefilled = start + len(row.ids)
            self._count("prompt_tokens", len(row.ids))
            if s.prefilled < len(s.prompt_ids):
                s.partial = self.layout.keep_partial(group, i, kv)
                if s not in self._prefilling:
                    self._prefilling.append(s)
                continue
            s.partial = None
            if s in self._prefilling:
                self._prefilling.remove(s)
            done.append(i)
        self.layout.store_heads(group, kv, done)
        if not done:
            return None
        logits = self.runner.logits(hidden[done, -1])  # [n, vocab]
        for i in done:
            s = seqs[i]
            if s.request.prefill_logprobs:
                s.prefill = self._prefill_tokens(s, hidden[i, -len(s.prompt_ids) :])
        free = kv.batch_size - len(seqs)  # slots left free for running rows to join (_make_room)
        slotted: list[Sequence | None] = list(seqs) + [None] * free
        mask, positions = inputs.mask, inputs.positions[:, -1] + 1
        if free:
            mask = torch.cat([mask, mask.new_zeros(free, mask.shape[1])])
            positions = torch.cat([positions, positions.new_zeros(free)])
        new = RunningBatch(
            rows=slotted,
            kv=kv,
            mask=mask,
            positions=positions,
            next_ids=torch.zeros(len(slotted), dtype=torch.long, device=self.device),
        ).filter(done)  # the rows still prefilling stay out (filter keeps the batch as it is when all are done)
        assert new is not None  # `done` is not empty
        return self._emit(new, logits)

    def _prefill_tokens(self, s: Sequence, hidden: torch.Tensor) -> list[Token]:
        """Prompt tokens with the logprob the model gave each (the first has none)."""
        ids = s.prompt_ids
        target = torch.tensor(ids[1:], device=hidden.device)
        picked: list[float] = []
        for start in range(0, len(ids) - 1, LOGPROB_CHUNK):  # bounded memory: [chunk, vocab] at a time
            logp = self.runner.logits(hidden[start : min(start + LOGPROB_CHUNK, len(ids) - 1)]).log_softmax(-1)
            picked += logp.gather(-1, target[start : start + logp.shape[0], None]).squeeze(-1).tolist()
        logprobs = [math.nan, *picked]
        return [
            Token(id=t, text=self.tokenizer.decode([t]), logprob=lp, special=t in self.special_ids)
            for t, lp in zip(ids, logprobs)
        ]

    def _emit(self, batch: RunningBatch, logits: torch.Tensor) -> RunningBatch | None:
        """Choose a token for every row, hand it to the caller, and drop finished or abandoned rows."""
        rows = batch.sequences()
        samplers = [r.sampler for r in rows]
        history = [
            torch.tensor(r.history(), device=logits.device) if r.sampler.repetition_penalty != 1.0 else None
            for r in rows
        ]
        ids = choose(logits, samplers, history)
        positions = batch.positions[batch.slots].tolist()
        if self.runner.forced_bos is not None or self.runner.forced_eos is not None:
            ids = self._forced(rows, ids, positions)
        logprobs = token_logprobs(logits, ids).tolist()
        id_list = ids.tolist()
        now = time.monotonic()
        keep = []
        finished = 0
        for i, r in enumerate(rows):
            if r.handle.cancelled:
                r.finish(CANCELLED)
                continue
            r.append(id_list[i], logprobs[i], self.tokenizer, positions[i], now)
            if r.finish_reason is not None:
                r.finish()
                finished += 1
            else:
                keep.append(i)
        self._count("generated_tokens", len(rows))
        self._count("finished", finished)
        batch.next_ids[batch.slots] = ids
        return batch.filter(keep)

    def _forced(self, rows: list[Sequence], ids: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """The generation config's forced tokens, as transformers' ForcedBOS/ForcedEOS logits processors do: the
        first generated token is forced_bos_token_id, the last one the row may generate forced_eos_token_id."""
        bos, eos = self.runner.forced_bos, self.runner.forced_eos
        forced = ids.tolist()
        for i, r in enumerate(rows):
            if bos is not None and not r.generated:
                forced[i] = bos
            elif eos is not None and (r.remaining <= 1 or positions[i] + 1 >= self.max_position):
                forced[i] = eos
        return torch.tensor(forced, dtype=ids.dtype, device=ids.device)

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for s in list(self._prefilling):
            if s.handle.cancelled or now > s.deadline:
                self._prefilling.remove(s)
                s.partial = None
                s.finish(CANCELLED if s.handle.cancelled else TIMEOUT)
        batch = self._batch
        if batch is None:
            return
        rows = batch.sequences()
        keep = [i for i, r in enumerate(rows) if not r.handle.cancelled]
        if len(keep) < len(rows):
            for r in rows:
                if r.handle.cancelled:
                    r.finish(CANCELLED)
            self._batch = batch.filter(keep)


def _abandoned(item) -> bool:
    return item.cancelled if isinstance(item, ClassifyJob) else item.handle.cancelled


def _eos_ids(loaded) -> frozenset[int]:
    ids: set[int] = set()
    for src in (loaded.model.config, getattr(loaded.model, "generation_config", None), loaded.tokenizer):
        value = getattr(src, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
