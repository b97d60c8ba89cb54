"""Crash safety: processes SIGKILLed at random points of uploads, replacements, deletes and sweeps leave a store in
which, once a server (re)starts on it, every adapter is wholly one version, its old or its new one, and nothing
else is served.

Three drivers, each counting kills, operations and inconsistencies (printed as one summary line per test and one
for the module):

- store: every upload, replace, delete and sweep runs in a process of its own, forked from a preloaded forkserver
  (milliseconds a kill instead of an interpreter's start-up), which dies by SIGKILL either right before its k-th
  file-system step -- mkdir, open, write (killed with half the bytes written), fsync, utime, rename, unlink, rmdir:
  every k of every kind of operation in turn, then at random -- or after a random delay sent from here. First a
  replace killed before each of its steps, each followed by a second write of the same adapter (a delete or a
  replace, killed in turn before each of its own steps where the first kill left the old version set aside); then
  runs of several operations between two restarts, with no sweep between them, as the surviving replicas of a store
  keep writing after one of them died. A restart is a fresh registry's load_store(), which sweeps. (These found
  three bugs, fixed in adapters/store.py: a version set aside by a killed replace came back after a later delete, a
  second writer killed while deleting it left half of it for the sweep to restore, and the next upload numbered its
  version from 1 again.)
- server: a real server process (`prompt_server.cli serve`, forked from the same forkserver) is SIGKILLed at a random
  moment of a run of HTTP uploads, replaces and deletes, then restarted on its store: every write it acknowledged is
  there, the one in flight wholly done or not at all, and it generates with every adapter as PEFT does.
- replicas: two servers on one store; the one that reads is killed while the other writes, and the writer while the
  other reads; the survivor keeps answering, at once lists for each adapter one version it may hold, and after the
  restart both list the same versions and generate with them as PEFT does.

After every restart the check is byte-exact: each adapter directory holds exactly the files of one version ever
uploaded for its id plus a meta.json naming that version's sha256 and the version number the writer chose (the one
before it plus one), and it is one the operations since the last check allow: the old state or the new one of a
killed operation, only the new one of an acknowledged one (deleted: absent). No `.old-*`/`.del-*` survives a sweep,
staging leftovers (`.tmp-*`) are never listed and go with sweep(max_age=0), and every listed adapter is served.

Short form by default (CI: about 250 kills, 1 to 1.5 min on 2 shared cores); the long form takes its round count
from the environment (store runs; a tenth as many server and replica kills):
    PROMPT_SERVER_KILL_ROUNDS=500 pytest -s tests/e2e/test_crash_safety.py -k long_form
(PROMPT_SERVER_KILL_SEED=<n> replays one run's random choices; every summary line prints its seed.)
"""

from __future__ import annotations

import builtins
import hashlib
import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from typing_extensions import Self

import prompt_server.adapters.store as store_module
from prompt_server.adapters.registry import AdapterRegistry
from prompt_server.adapters.store import AdapterStore
from prompt_server.adapters.types import ModelSpec
from tests.e2e.conftest import LIMITS
from tests.e2e.server import free_port, wait_healthy

LONG_ROUNDS = int(os.environ.get("PROMPT_SERVER_KILL_ROUNDS") or 0)
SEED = int(os.environ.get("PROMPT_SERVER_KILL_SEED") or time.time_ns() % 1_000_000)

IDS = ("a", "b", "c", "d")
PROMPT = "Once upon a time"
N_TOKENS = 6
VARIANTS = ("prompt_tuning", "p_tuning_mlp", "prefix", "prompt_tuning", "prefix_projection", "p_tuning_lstm")
CONFIG, WEIGHTS, META = "adapter_config.json", "adapter_model.safetensors", "meta.json"

State = tuple[int, int] | None  # (weight set, version) of an adapter; None: absent


# ---------------------------------------------------------------- in the killed processes (forked from the forkserver)

class _Killer:
    """Counts the file-system steps of an operation and SIGKILLs the process right before step `at`."""

    def __init__(self, at: int | None):
        self.at = at
        self.n = 0

    def step(self, half: Callable[[], object] | None = None) -> None:
        if self.n == self.at:
            if half is not None:
                half()
            os.kill(os.getpid(), signal.SIGKILL)
        self.n += 1


class _File:
    """A file the store opened for writing: each write() is a step, killed with half its bytes on disk."""

    def __init__(self, fh: Any, killer: _Killer):
        self.fh, self.killer = fh, killer

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def write(self, data: bytes) -> int:
        def half() -> None:
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()

        self.killer.step(half)
        return self.fh.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)


def _arm(at: int | None) -> _Killer:
    """Route the os calls that change the store through a killer (this process only: it is a fresh fork)."""
    killer = _Killer(at)
    for name in ("mkdir", "rename", "replace", "utime", "fsync", "unlink", "remove", "rmdir"):
        real = getattr(os, name)

        def hooked(*args: Any, _real: Callable[..., Any] = real, **kwargs: Any) -> Any:
            killer.step()
            return _real(*args, **kwargs)

        setattr(os, name, hooked)

    def opened(*args: Any, **kwargs: Any) -> Any:
        killer.step()
        return _File(builtins.open(*args, **kwargs), killer)

    store_module.open = opened  # type: ignore[attr-defined]  # _write's open(), found before the builtin
    return killer


def _op_child(kind: str, store: str, spec: ModelSpec, adapter_id: str, files: dict[str, bytes] | None,
              kill_at: int | None, result: str) -> None:
    """One store operation, as a replica does it (no sweep first); writes {steps, outcome} to `result` if it lives."""
    killer = _arm(kill_at)
    outcome: Any
    if kind == "put":
        record, created = AdapterRegistry(spec, store=Path(store)).put(adapter_id, files or {})
        outcome = {"version": record.version, "sha256": record.sha256, "created": created}
    elif kind == "delete":
        outcome = {"deleted": AdapterRegistry(spec, store=Path(store)).delete(adapter_id)}
    else:
        outcome = {"done": AdapterStore(store).sweep()}
    killer.at = None
    steps = killer.n
    with builtins.open(result + ".part", "w") as fh:
        json.dump({"steps": steps, "outcome": outcome}, fh)
    os.rename(result + ".part", result)  # whole or absent: a timed kill may land here too
    os._exit(0)  # at once: multiprocessing's orderly exit of a process that loaded torch takes a third of a second


def _noop() -> None:
    os._exit(0)


def _serve_child(argv: list[str], log: str) -> None:
    """`prompt-server serve ...` in this (forked) process, its output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # tqdm's lock is a semaphore, which a SIGKILL would leak
    from prompt_server.cli import main

    sys.exit(main(argv))


# ----------------------------------------------------------------------------------------------- the test's side

@dataclass(frozen=True)
class Weights:
    files: dict[str, bytes]  # as uploaded
    sha: str  # sha256 of the weights file
    tokens: list[int]  # PEFT's greedy tokens for PROMPT


@dataclass
class Stats:
    kills: Counter = field(default_factory=Counter)  # by where they landed
    ops: Counter = field(default_factory=Counter)  # upload, replace, delete, sweep, read (by a replica's reader)
    restarts: int = 0
    tmp_swept: int = 0
    repaired_on_read: int = 0  # replaces killed between their renames, repaired by a reader without a restart
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, other: Stats) -> None:
        self.kills.update(other.kills)
        self.ops.update(other.ops)
        self.restarts += other.restarts
        self.tmp_swept += other.tmp_swept
        self.repaired_on_read += other.repaired_on_read
        self.problems += other.problems

    def line(self, what: str) -> str:
        kills = sum(self.kills.values())
        how = ", ".join(f"{n} {k}" for k, n in sorted(self.kills.items()))
        ops = ", ".join(f"{self.ops[k]} {k}s" for k in ("upload", "replace", "delete", "sweep", "read") if self.ops[k])
        return (f"crash safety [{what}, seed {SEED}]: {kills} SIGKILLs survived ({how}); tried {ops}; "
                f"{self.restarts} restarts checked; {self.tmp_swept} staging leftovers swept; "
                f"{self.repaired_on_read} interrupted replaces repaired on read; "
                f"{len(self.problems)} inconsistencies found; {time.monotonic() - self.started:.1f} s")


class Ledger:
    """What each id may hold since the last check: a set of states, more than one after a killed operation."""

    def __init__(self, lib: list[Weights], stats: Stats):
        self.lib, self.stats = lib, stats
        self.by_sha = {w.sha: n for n, w in enumerate(lib)}
        self.allowed: dict[str, set[State]] = {i: {None} for i in IDS}
        self.history: list[str] = []  # what happened since the last check, for the report of an inconsistency
        self.reported = 0  # problems raised so far

    def problem(self, text: str) -> None:
        self.stats.problems.append(text)
        print("INCONSISTENCY:", text, flush=True)

    def kind(self, adapter_id: str) -> str:
        return "upload" if self.allowed[adapter_id] == {None} else "replace"

    def put(self, adapter_id: str, w: int, ack: dict[str, Any] | None) -> None:
        """An upload of weight set w: `ack` the writer's answer, None if it was killed before answering."""
        before = self.allowed[adapter_id]
        new = {(w, (s[1] if s else 0) + 1) for s in before}
        if ack is None:
            self.allowed[adapter_id] = before | new
            return
        state = (w, ack["version"])
        if state not in new or ack["sha256"] != self.lib[w].sha:
            self.problem(f"put {adapter_id} answered version {ack['version']} sha {ack['sha256'][:12]}, expected one "
                         f"of {sorted(new)}")
        self.allowed[adapter_id] = {state}

    def delete(self, adapter_id: str, ack: bool | None) -> None:
        before = self.allowed[adapter_id]
        if ack is None:
            self.allowed[adapter_id] = before | {None}
            return
        if (ack and before == {None}) or (not ack and None not in before):
            self.problem(f"delete {adapter_id} answered {ack} while it held {sorted(before, key=str)}")
        self.allowed[adapter_id] = {None}

    def expected(self) -> dict[str, tuple[int, int]]:
        """The one state of every present id (after a check)."""
        out = {}
        for adapter_id, states in self.allowed.items():
            assert len(states) == 1, (adapter_id, states)
            (state,) = states
            if state is not None:
                out[adapter_id] = state
        return out

    def disk_state(self, path: Path) -> State | str:
        """The version an adapter directory wholly holds, or what is wrong with it."""
        if not os.path.lexists(path):
            return None
        names = sorted(os.listdir(path))
        if names != [CONFIG, WEIGHTS, META]:
            return f"files {names}"
        weights = (path / WEIGHTS).read_bytes()
        sha = hashlib.sha256(weights).hexdigest()
        w = self.by_sha.get(sha)
        if w is None:
            return f"weights {sha[:12]} of no uploaded version"
        if (path / CONFIG).read_bytes() != self.lib[w].files[CONFIG]:
            return f"config not weight set {w}'s"
        try:
            meta = json.loads((path / META).read_bytes())
        except ValueError as e:
            return f"meta.json: {e}"
        if meta.get("sha256") != sha or meta.get("size_bytes") != sum(map(len, self.lib[w].files.values())):
            return f"meta.json {meta} does not describe weight set {w}"
        return (w, meta.get("version"))

    def check_live_read(self, store: Path, spec: ModelSpec) -> None:
        """Before any sweep, as a replica that was running all along reads it: every id serves a state it may hold,
        and a replace killed between its renames (`.old-<id>` alone) is repaired by that read."""
        live = AdapterRegistry(spec, store=store)  # no load_store(): no sweep
        for adapter_id in IDS:
            alone = (store / f".old-{adapter_id}").exists() and not (store / adapter_id).exists()
            record = live.get(adapter_id)
            state = (self.by_sha.get(record.sha256), record.version) if record is not None else None
            if state not in self.allowed[adapter_id]:
                self.problem(f"a live read of {adapter_id} served {state}, not one of "
                             f"{sorted(self.allowed[adapter_id], key=str)}")
            if alone:
                if record is None or not (store / adapter_id).exists():
                    self.problem(f"a live read did not repair {adapter_id}, set aside by a killed replace")
                self.stats.repaired_on_read += 1

    def check_restart(self, store: Path, spec: ModelSpec, *, sweep_staging: bool = True) -> None:
        """Restart on the store (a fresh registry: sweep, load), check every id against what it may hold, and
        narrow the ledger to what it holds. sweep_staging: no writer is running, so `.tmp-*` may go too."""
        self.stats.restarts += 1
        self.check_live_read(store, spec)
        fresh = AdapterRegistry(spec, store=store)
        skipped = fresh.load_store()
        if skipped:
            self.problem(f"restart skipped {skipped}")
        hidden = sorted(e for e in os.listdir(store) if e.startswith(".") and e != ".lock")
        for name in hidden:
            if not name.startswith(".tmp-"):
                self.problem(f"{name} left after the sweep")
        served = {r.id: (self.by_sha.get(r.sha256), r.version) for r in fresh.list()}
        ids = set(fresh.store.ids()) if fresh.store else set()
        if ids - set(IDS) or set(served) - set(IDS):
            self.problem(f"unknown ids {sorted((ids | set(served)) - set(IDS))}")
        for adapter_id in IDS:
            state = self.disk_state(store / adapter_id)
            if isinstance(state, str):
                self.problem(f"{adapter_id} is no whole version: {state}")
                state = served.get(adapter_id)
            elif state not in self.allowed[adapter_id]:
                self.problem(f"{adapter_id} holds {state}, not one of {sorted(self.allowed[adapter_id], key=str)}")
            if served.get(adapter_id) != state:
                self.problem(f"{adapter_id}: served {served.get(adapter_id)}, on disk {state}")
            self.allowed[adapter_id] = {state}
        if len(fresh) != len(served):
            self.problem(f"len() {len(fresh)} != {len(served)} listed")
        if sweep_staging:
            before = sum(name.startswith(".tmp-") for name in hidden)
            AdapterStore(store).sweep(max_age=0)
            left = sorted(e for e in os.listdir(store) if e.startswith(".") and e != ".lock")
            if left:
                self.problem(f"sweep(max_age=0) left {left}")
            self.stats.tmp_swept += before
        if len(self.stats.problems) > self.reported:  # stop at the first: what follows would only repeat it
            self.reported = len(self.stats.problems)
            raise AssertionError("\n".join([f"seed {SEED}: inconsistent store after:", *self.history,
                                             *self.stats.problems]))
        self.history = []


@pytest.fixture(scope="module")
def library(tiny_llama_dir, tmp_path_factory) -> list[Weights]:
    from tests.api.oracle import peft_greedy
    from tests.tiny import make_peft, save_peft

    lib = []
    for n, variant in enumerate(VARIANTS):
        peft = make_peft(tiny_llama_dir, variant, seed=100 + n)
        path = save_peft(peft, tmp_path_factory.mktemp(f"w{n}"))
        files = {p.name: p.read_bytes() for p in path.iterdir() if p.name != "README.md"}
        assert sorted(files) == [CONFIG, WEIGHTS]
        lib.append(Weights(files, hashlib.sha256(files[WEIGHTS]).hexdigest(),
                           peft_greedy(peft, tiny_llama_dir, PROMPT, N_TOKENS)))
    assert len({w.sha for w in lib}) == len(lib)
    return lib


@pytest.fixture(scope="module")
def spec(tiny_llama_dir) -> ModelSpec:
    from transformers import AutoConfig

    return ModelSpec.from_config(AutoConfig.from_pretrained(tiny_llama_dir))


# imported once by the forkserver, not by every server it forks (names it cannot import are skipped): the server and
# what transformers imports lazily to load the tiny Llama and its tokenizer, seconds a start otherwise
PRELOAD = [__name__, "prompt_server.cli", "prompt_server.main", "prompt_server.model.loader",
           "prompt_server.engine.engine", "uvicorn", "fastapi", "transformers", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto",
           "transformers.models.llama.configuration_llama", "transformers.models.llama.modeling_llama",
           "transformers.tokenization_utils_tokenizers", "transformers.tokenization_utils_fast",
           "transformers.generation.utils", "transformers.generation.continuous_batching"]


@pytest.fixture(scope="module")
def forks() -> Any:
    """A forkserver that has imported the server and this module: each killed process is a fork of it."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    from multiprocessing import forkserver

    forkserver.ensure_running()  # it imports while the other fixtures build the adapters; _warm() waits for it
    return ctx


def _warm(ctx: Any) -> None:
    """Wait for the forkserver to be ready, so that no timed operation includes its start."""
    warm = ctx.Process(target=_noop)
    warm.start()
    warm.join()


@pytest.fixture
def scratch(tmp_path) -> Iterator[Path]:
    """A directory for the store-level driver, in memory where the machine has /dev/shm: a SIGKILL loses nothing
    that fsync() would have kept (the kernel keeps the process's writes), so the kills test the same states without
    waiting for the disk at each fsync."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="crash-safety-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


TOTAL = Stats()


@pytest.fixture(scope="module", autouse=True)
def summary() -> Iterator[None]:
    yield
    if TOTAL.restarts:
        print("\n" + TOTAL.line("all drivers"), flush=True)


def _report(stats: Stats, what: str) -> None:
    print("\n" + stats.line(what), flush=True)
    TOTAL.add(stats)
    assert not stats.problems, stats.problems


def _seed_store(store: Path, spec: ModelSpec, ledger: Ledger) -> None:
    registry = AdapterRegistry(spec, store=store)
    for n, adapter_id in enumerate(IDS[:3]):
        record, _ = registry.put(adapter_id, ledger.lib[n].files)
        ledger.allowed[adapter_id] = {(n, record.version)}


# -------------------------------------------------------------------------------------------- store-level driver

STEP_KINDS = ("upload", "replace", "delete", "sweep")
MIN_BURSTS = 20  # of the short form, after the replaces followed by a second write


class StoreKills:
    """Operations in processes of their own, killed at file-system steps or at random moments."""

    def __init__(self, ctx: Any, store: Path, work: Path, spec: ModelSpec, ledger: Ledger, rng: random.Random):
        self.ctx, self.store, self.work, self.spec, self.ledger, self.rng = ctx, store, work, spec, ledger, rng
        self.stats = ledger.stats
        self.steps: dict[str, int] = {}  # most steps an unkilled operation of each kind took
        self.took: dict[str, list[float]] = {}  # how long unkilled ones took, start to exit
        self.pending: dict[str, list[int]] = {}  # step numbers not yet killed at (coverage)
        self.n = 0

    def run(self, kind: str, adapter_id: str, w: int | None, mode: str, kill_at: int | None = None) -> None:
        """One operation; mode: "step" (killed before a step: kill_at, else one not yet covered, else a random one),
        "timer" (killed after a random delay) or "none"."""
        op = "put" if kind in ("upload", "replace") else kind
        if mode == "step" and kind not in self.steps and kill_at is None:
            mode = "none"  # not calibrated yet: learn its steps first
        if mode == "step" and kill_at is None:
            queue = self.pending.setdefault(kind, [])
            kill_at = queue.pop() if queue else self.rng.randint(0, self.steps[kind])
        self.n += 1
        result = self.work / f"result-{self.n}.json"
        files = self.ledger.lib[w].files if w is not None else None
        proc = self.ctx.Process(target=_op_child, args=(op, str(self.store), self.spec, adapter_id, files, kill_at,
                                                        str(result)))
        t0 = time.monotonic()
        proc.start()
        if mode == "timer":
            took = sorted(self.took.get(kind) or [0.05])
            time.sleep(self.rng.uniform(0, took[len(took) // 2]))
            proc.kill()
        proc.join(60)
        assert proc.exitcode is not None, "an operation hung"
        out = json.loads(result.read_text()) if result.exists() else None
        if out is None:
            if proc.exitcode != -signal.SIGKILL:
                self.ledger.problem(f"{kind} {adapter_id} exited with {proc.exitcode} (see the output above)")
            self.stats.kills["at a file-system step" if mode == "step" else "at a random moment"] += 1
        elif mode == "none":
            self.took.setdefault(kind, []).append(time.monotonic() - t0)
            if kind not in self.steps:
                self.pending[kind] = list(range(out["steps"] + 1))
                self.rng.shuffle(self.pending[kind])
            self.steps[kind] = max(self.steps.get(kind, 0), out["steps"])
        self.stats.ops[kind] += 1
        ack = out["outcome"] if out else None
        what = f"kill before step {kill_at}" if mode == "step" else "kill at a random moment" if mode == "timer" else ""
        self.ledger.history.append(f"{kind} {adapter_id} w{w} {what}: {'killed' if out is None else ack}")
        if op == "put":
            assert w is not None
            self.ledger.put(adapter_id, w, ack)
        elif op == "delete":
            self.ledger.delete(adapter_id, None if ack is None else ack["deleted"])

    def burst(self) -> None:
        """A few operations (and sometimes a sweep) with no restart between them, then a restart and the check."""
        adapter_id = self.rng.choice(IDS)
        for _ in range(self.rng.randint(1, 4)):
            if self.rng.random() < 0.4:  # else the same id again: a write after a killed write of it
                adapter_id = self.rng.choice(IDS)
            present = self.ledger.allowed[adapter_id] != {None}
            if present and self.rng.random() < 0.3:
                kind, w = "delete", None
            else:
                kind, w = self.ledger.kind(adapter_id), self.rng.randrange(len(self.ledger.lib))
            self.run(kind, adapter_id, w, self._mode())
            if self.rng.random() < 0.2:
                self.run("sweep", "", None, self._mode())
        self.ledger.check_restart(self.store, self.spec)

    def after_killed_replace(self) -> None:
        """A replace killed before each of its steps, then what a surviving replica does next, before any restart
        sweeps. Where the kill left the old version set aside as the only copy: a delete and a replace, unkilled and
        killed before every step of their own; set aside beside the new version (a leftover): both, unkilled and
        killed at a random step; else one of them."""
        steps = {kind: self.steps[kind] for kind in ("replace", "delete")}
        for k in range(steps["replace"] + 1):
            state = self._pair(k, ("replace", "delete")[k % 2], None)
            if state == "only":
                followups = [(kind, k2) for kind in ("replace", "delete") for k2 in [None, *range(steps[kind] + 1)]]
            elif state == "leftover":
                followups = [(kind, k2) for kind in ("replace", "delete")
                             for k2 in (None, self.rng.randint(0, steps[kind]))]
            else:
                continue
            for kind, k2 in followups:
                self._pair(k, kind, k2)
        self.pending["replace"] = []

    def _pair(self, k: int, kind: str, k2: int | None) -> str:
        """Replace "a" killed before step k, then `kind` on it killed before step k2 (None: not killed), then a
        restart. Returns what the kill left: "only" (the old version set aside, "a" gone), "leftover" (set aside
        beside "a"), or "" (nothing set aside)."""
        if self.ledger.allowed["a"] == {None}:
            self.run("upload", "a", self.rng.randrange(len(self.ledger.lib)), "none")
        self.run("replace", "a", self.rng.randrange(len(self.ledger.lib)), "step", kill_at=k)
        state = ("leftover" if (self.store / "a").exists() else "only") if (self.store / ".old-a").exists() else ""
        self.run(kind, "a", self.rng.randrange(len(self.ledger.lib)) if kind == "replace" else None,
                 "none" if k2 is None else "step", kill_at=k2)
        self.ledger.check_restart(self.store, self.spec)
        return state

    def _mode(self) -> str:
        r = self.rng.random()
        return "step" if r < 0.65 else "timer" if r < 0.9 else "none"

    def covered(self) -> bool:
        return all(kind in self.steps and not self.pending.get(kind) for kind in STEP_KINDS)


def _store_driver(forks, spec, library, tmp_path, rounds: int | None) -> Stats:
    stats = Stats()
    ledger = Ledger(library, stats)
    store, work = tmp_path / "store", tmp_path / "work"
    work.mkdir()
    _seed_store(store, spec, ledger)
    driver = StoreKills(forks, store, work, spec, ledger, random.Random(SEED))
    _warm(forks)
    # calibrate each kind once (no kill), so every step of it is then killed at
    for kind, adapter_id in (("replace", "a"), ("upload", "d"), ("delete", "d")):
        driver.run(kind, adapter_id, 4 if kind != "delete" else None, "none")
    (store / ".old-c").mkdir()  # a leftover for the sweep to remove
    driver.run("sweep", "", None, "none")
    ledger.check_restart(store, spec)
    driver.after_killed_replace()
    done = 0
    while (rounds is None and (done < MIN_BURSTS or not driver.covered())) or (rounds is not None and done < rounds):
        driver.burst()
        done += 1
        if rounds is None and done > 400:
            raise AssertionError(f"step coverage not reached: {driver.pending}")
    return stats


def test_kills_inside_store_writes_leave_whole_versions(forks, spec, library, scratch):
    """Every file-system step of an upload, a replace, a delete and a sweep killed at least once, plus random
    moments; several operations between restarts."""
    _report(_store_driver(forks, spec, library, scratch, None), "store: every step")


# ------------------------------------------------------------------------------------------------ server drivers

class ForkedServer:
    """A `prompt-server serve` process on the tiny model and `store`, forked from the forkserver."""

    def __init__(self, ctx: Any, model_dir: Path, store: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = ["serve", "--model", str(model_dir), "--adapters", str(store), "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning", *LIMITS]
        self.proc = ctx.Process(target=_serve_child, args=(argv, str(log)), daemon=True)
        self.proc.start()
        try:
            wait_healthy(self.url, self.proc, log)
        except RuntimeError:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(30)


def _generate(url: str, adapter_id: str) -> httpx.Response:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": N_TOKENS, "details": True}}
    return httpx.post(f"{url}/generate", json=body, timeout=60)


def _tokens(r: httpx.Response) -> list[int]:
    return [t["id"] for t in r.json()["details"]["tokens"]]


def check_server(url: str, ledger: Ledger, label: str) -> None:
    """The server lists exactly the versions the ledger holds and generates with each as PEFT does."""
    expected = ledger.expected()
    adapters = httpx.get(f"{url}/adapters", timeout=30).json()["adapters"]
    listed = {a["id"]: (ledger.by_sha.get(a["sha256"]), a["version"]) for a in adapters}
    if listed != expected:
        ledger.problem(f"{label} lists {listed}, the store holds {expected}")
    for adapter_id, (w, _) in expected.items():
        r = _generate(url, adapter_id)
        if r.status_code != 200 or _tokens(r) != ledger.lib[w].tokens:
            ledger.problem(f"{label} generates with {adapter_id}: {r.status_code} {r.text[:200]}")


@dataclass
class Op:
    kind: str  # upload, replace, delete
    adapter_id: str
    w: int | None = None


def _plan(ledger: Ledger, rng: random.Random, n: int) -> list[Op]:
    """n operations on distinct ids (so that at most the one in flight at a kill is in doubt)."""
    ops = []
    for adapter_id in rng.sample(IDS, n):
        present = ledger.allowed[adapter_id] != {None}
        if present and rng.random() < 0.35:
            ops.append(Op("delete", adapter_id))
        else:
            ops.append(Op(ledger.kind(adapter_id), adapter_id, rng.randrange(len(ledger.lib))))
    return ops


def _send(url: str, ops: list[Op], answers: list[Any], lib: list[Weights]) -> None:
    """Send ops in turn, appending each answer; stop at the first that gets none (the server died)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        for op in ops:
            try:
                if op.w is not None:
                    files = {n: (n, b) for n, b in lib[op.w].files.items()}
                    r = http.put(f"/adapters/{op.adapter_id}", files=files)
                    answers.append(r.json() if r.status_code in (200, 201) else r)
                else:
                    r = http.delete(f"/adapters/{op.adapter_id}")
                    answers.append(r.status_code == 204 if r.status_code in (204, 404) else r)
            except httpx.TransportError:
                return


def _apply(ledger: Ledger, ops: list[Op], answers: list[Any]) -> bool:
    """Narrow the ledger by the answers; the op after the last answer was in flight. True if one was."""
    ledger.history += [f"{op} -> {answers[i] if i < len(answers) else 'no answer'}" for i, op in enumerate(ops)]
    for i, op in enumerate(ops):
        ledger.stats.ops[op.kind] += i <= len(answers)
        ack = answers[i] if i < len(answers) else None
        if isinstance(ack, httpx.Response):
            ledger.problem(f"{op} answered {ack.status_code} {ack.text[:200]}")
            ack = None
        if i > len(answers):
            break  # never sent
        if op.kind == "delete":
            ledger.delete(op.adapter_id, ack)
        else:
            assert op.w is not None
            ledger.put(op.adapter_id, op.w, ack)
    return len(answers) < len(ops)


def _seeded(spec, library, tmp_path) -> tuple[Stats, Ledger, Path]:
    """A fresh ledger and a store seeded with its first versions."""
    stats = Stats()
    ledger = Ledger(library, stats)
    store = tmp_path / "store"
    _seed_store(store, spec, ledger)
    return stats, ledger, store


def _server_driver(forks, spec, library, tiny_llama_dir, tmp_path, rounds: int) -> Stats:
    stats, ledger, store = _seeded(spec, library, tmp_path)
    rng = random.Random(SEED + 1)
    took = 0.0
    for n in range(rounds + 1):
        server = ForkedServer(forks, tiny_llama_dir, store, tmp_path / f"server-{n}.log")
        check_server(server.url, ledger, f"server {n}")
        ops = _plan(ledger, rng, 3)
        answers: list[Any] = []
        sender = threading.Thread(target=_send, args=(server.url, ops, answers, library))
        t0 = time.monotonic()
        sender.start()
        if n == 0:  # calibration: how long a run of operations takes
            sender.join()
            took = time.monotonic() - t0
        else:
            time.sleep(rng.uniform(0, took))
        server.kill()
        sender.join()
        if n > 0:
            stats.kills["server mid-request" if len(answers) < len(ops) else "server between requests"] += 1
        _apply(ledger, ops, answers)
        ledger.check_restart(store, spec)
    final = ForkedServer(forks, tiny_llama_dir, store, tmp_path / "server-final.log")
    try:
        check_server(final.url, ledger, "final server")
    finally:
        final.kill()
    return stats


def test_server_killed_mid_request_restarts_consistent(forks, spec, library, tiny_llama_dir, tmp_path):
    _report(_server_driver(forks, spec, library, tiny_llama_dir, tmp_path, 4), "server")


def _reader(url: str, ledger: Ledger, stop: threading.Event, rng: random.Random) -> None:
    """Read from a replica until stopped: every answer a 200 of a known version or a 404, never an error."""
    known = {w.sha for w in ledger.lib}
    tokens = [w.tokens for w in ledger.lib]
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            adapter_id = rng.choice(IDS)
            try:
                r = http.get(f"/adapters/{adapter_id}")
                if r.status_code == 200 and r.json()["sha256"] not in known:
                    ledger.problem(f"reader got unknown sha for {adapter_id}")
                elif r.status_code not in (200, 404):
                    ledger.problem(f"reader got {r.status_code} {r.text[:200]}")
                g = _generate(url, adapter_id)
                if g.status_code == 200 and _tokens(g) not in tokens:
                    ledger.problem(f"reader generated {_tokens(g)} with {adapter_id}, no version's tokens")
                elif g.status_code not in (200, 404):
                    ledger.problem(f"reader generate got {g.status_code} {g.text[:200]}")
                ledger.stats.ops["read"] += 1
            except httpx.TransportError:  # this replica was killed
                return


def _replica_driver(forks, spec, library, tiny_llama_dir, tmp_path, rounds: int) -> Stats:
    stats, ledger, store = _seeded(spec, library, tmp_path)
    rng = random.Random(SEED + 2)
    servers = [ForkedServer(forks, tiny_llama_dir, store, tmp_path / f"replica-{i}.log") for i in (0, 1)]
    took = 0.0
    try:
        for n in range(rounds + 1):
            for i, s in enumerate(servers):
                check_server(s.url, ledger, f"replica {i}")
            victim = rng.randrange(2)
            kill_writer = n % 2 == 1
            writer = servers[victim if kill_writer else 1 - victim]
            reader = servers[1 - victim if kill_writer else victim]
            ops = _plan(ledger, rng, 3)
            answers: list[Any] = []
            stop = threading.Event()
            threads = [threading.Thread(target=_send, args=(writer.url, ops, answers, library)),
                       threading.Thread(target=_reader, args=(reader.url, ledger, stop, random.Random(rng.random())))]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            if n == 0:
                threads[0].join()
                took = time.monotonic() - t0
            else:
                time.sleep(rng.uniform(0, took))
                servers[victim].kill()
                stats.kills["replica writing" if kill_writer else "replica reading"] += 1
            threads[0].join()
            stop.set()
            threads[1].join()
            in_flight = _apply(ledger, ops, answers)
            if not kill_writer and in_flight:
                ledger.problem(f"the surviving writer did not answer: {answers}")
            survivor = servers[1 - victim]
            if not survivor.proc.is_alive():
                ledger.problem("the survivor died")
            # at once, before anyone restarts or sweeps, the survivor serves for each id one state it may hold,
            # repairing on read a replace killed between its renames (`.old-<id>` alone)
            alone = [i for i in IDS if (store / f".old-{i}").exists() and not (store / i).exists()]
            listed = {a["id"]: (ledger.by_sha.get(a["sha256"]), a["version"])
                      for a in httpx.get(f"{survivor.url}/adapters", timeout=30).json()["adapters"]}
            for adapter_id in IDS:
                if listed.get(adapter_id) not in ledger.allowed[adapter_id]:
                    ledger.problem(f"the survivor lists {adapter_id} as {listed.get(adapter_id)}, not one of "
                                   f"{sorted(ledger.allowed[adapter_id], key=str)}")
            for adapter_id in alone:
                if (store / f".old-{adapter_id}").exists() or not (store / adapter_id).exists():
                    ledger.problem(f"the survivor did not repair {adapter_id}, set aside by a killed replace")
                stats.repaired_on_read += 1
            if n > 0:
                servers[victim] = ForkedServer(forks, tiny_llama_dir, store, tmp_path / f"replica-{victim}-{n}.log")
            ledger.check_restart(store, spec)
        for i, s in enumerate(servers):
            check_server(s.url, ledger, f"replica {i}")
    finally:
        for s in servers:
            s.kill()
    return stats


def test_replica_killed_while_the_other_writes_or_reads(forks, spec, library, tiny_llama_dir, tmp_path):
    _report(_replica_driver(forks, spec, library, tiny_llama_dir, tmp_path, 4), "replicas")


# ---------------------------------------------------------------------------------------------------- long form

long_form = pytest.mark.skipif(not LONG_ROUNDS, reason="long form: set PROMPT_SERVER_KILL_ROUNDS, e.g. 500")


@long_form
def test_long_form_store(forks, spec, library, scratch):
    """PROMPT_SERVER_KILL_ROUNDS rounds of operations killed in processes of their own."""
    _report(_store_driver(forks, spec, library, scratch, LONG_ROUNDS), f"store, {LONG_ROUNDS} rounds")


@long_form
def test_long_form_server(forks, spec, library, tiny_llama_dir, tmp_path):
    """A tenth as many server kills (each a server start)."""
    rounds = max(1, LONG_ROUNDS // 10)
    _report(_server_driver(forks, spec, library, tiny_llama_dir, tmp_path, rounds), f"server, {rounds} rounds")


@long_form
def test_long_form_replicas(forks, spec, library, tiny_llama_dir, tmp_path):
    rounds = max(2, LONG_ROUNDS // 10)
    _report(_replica_driver(forks, spec, library, tiny_llama_dir, tmp_path, rounds), f"replicas, {rounds} rounds")
