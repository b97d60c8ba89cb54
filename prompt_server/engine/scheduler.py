"""The scheduler: what each step runs. It decides; the engine executes (runner.step) and updates.

A step runs at most `max_step_tokens` tokens: one for each running row, the rest for prompts, rows mid-prefill
first, then waiting requests in arrival order. A newcomer whose adapter's virtual tokens have no cached keys/values
yet (engine/prompt_kv.py) also costs those tokens, once per adapter version in a step, since they run in that step
too. A prompt longer than what is left is prefilled in chunks over several steps (a request asking for every prompt
token's logprob, whose virtual tokens run inline, or whose prompt an encoder reads, is prefilled whole). A waiting
request is admitted only while the batch-size and memory limits hold, memory being what the right-aligned cache
holds at its widest: rows x (widest row + most new tokens still to come).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from prompt_server.adapters.types import SoftPrompt
from prompt_server.engine.classify import ClassifyJob
from prompt_server.engine.prompt_kv import key_of
from prompt_server.engine.sequence import Sequence
from prompt_server.engine.types import CANCELLED, TIMEOUT, FinishReason

# The smallest prompt chunk a step gives a row, whatever the running rows take of max_step_tokens.
MIN_CHUNK = 16


@dataclass
class StepPlan:
    prefill: list[Sequence] = field(default_factory=list)  # rows to prefill this step, `chunk` set on each
    classify: list[ClassifyJob] = field(default_factory=list)
    expired: list[tuple[Sequence, FinishReason]] = field(default_factory=list)  # left the queue: cancelled, timeout


class Scheduler:
    def __init__(self, settings, soft_cached: Callable[[SoftPrompt], bool] | None = None):
        """`soft_cached(adapter)`: whether the adapter's virtual tokens have cached keys/values (None: no such cache;
        they run inline with the prompt and count in its `embed_len`)."""
        self.settings = settings
        self.soft_cached = soft_cached

    def _soft_cost(self, item: Sequence, computing: set) -> int:
        """Virtual tokens this step must run to give `item` its soft prompt's keys/values: none when they are
        cached, run inline, or already being computed this step for another row of the same adapter version."""
        a = item.adapter
        if (self.soft_cached is None or a is None or a.virtual_tokens is None or item.inline_virtual
                or key_of(a) in computing or self.soft_cached(a)):
            return 0
        return a.num_virtual_tokens

    def plan(self, running: list[Sequence], width: int, prefilling: list[Sequence],
             waiting: collections.deque, now: float) -> StepPlan:
        """Choose this step's prefill chunks and admissions; pops what it takes (or drops) from `waiting`."""
        plan = StepPlan()
        rows = running + prefilling
        size = len(rows)
        width = max([width] + [r.soft_len + len(r.prompt_ids) for r in rows])
        ahead = max((r.remaining for r in rows), default=0)
        # at least a small chunk each step, so prompts progress whatever the number of running rows
        budget = max(self.settings.max_step_tokens - len(running), MIN_CHUNK)
        computing: set = set()  # adapter versions whose virtual tokens this step runs
        for s in prefilling:
            s.chunk = min(s.to_prefill, budget)
            if s.chunk > 0:
                budget -= s.chunk
                plan.prefill.append(s)
        while waiting:
            item = waiting[0]
            if isinstance(item, ClassifyJob):  # one classification per step, in its place in the queue
                if item.cancelled or not plan.classify:
                    waiting.popleft()
                    if not item.cancelled:
                        plan.classify.append(item)
                    continue
                break
            if item.handle.cancelled or now > item.deadline:
                waiting.popleft()
                plan.expired.append((item, CANCELLED if item.handle.cancelled else TIMEOUT))
                continue
            new_width = max(width, item.soft_len + len(item.prompt_ids))
            new_ahead = max(ahead, item.request.max_new_tokens)
            fits = size + 1 <= self.settings.max_batch_size and (
                size == 0 or (size + 1) * (new_width + new_ahead) <= self.settings.max_batch_tokens
            )
            whole = (item.request.prefill_logprobs or not item.chunked
                     or (item.adapter is not None and item.inline_virtual))
            soft = self._soft_cost(item, computing)
            need = soft + (item.embed_len if whole else min(item.embed_len, MIN_CHUNK))
            if not fits or (plan.prefill and need > budget):
                break
            waiting.popleft()
            if soft and item.adapter is not None:
                computing.add(key_of(item.adapter))
                budget -= soft
            item.chunk = len(item.prompt_ids) if whole else min(len(item.prompt_ids), max(budget, MIN_CHUNK))
            budget -= item.chunk
            plan.prefill.append(item)
            size, width, ahead = size + 1, new_width, new_ahead
        return plan
