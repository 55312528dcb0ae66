"""A pool of worker processes that runs verifier calls, each bounded by a timeout.

Why processes: a verifier can hang (sympy on "$9^{9^{9^{9}}}$" inside a C call that no signal
interrupts), kill its interpreter (a segfault, os._exit, the OOM killer), or need signal.alarm,
which works only in a main thread. Each worker runs calls in its main thread; the pool kills a
worker that runs past `call_timeout_s` and replaces any worker that died, so a bad response
costs that sample's reward (0.0, counted by `score_each`), never the run.

Start method "spawn": the trainer holds torch threads (OpenMP, CUDA), and fork() copies a process
with threads in an undefined state. A spawned worker is a fresh interpreter that gets the
parent's sys.path, so anything the parent can import by name the worker can import too; it
imports what the verifier needs on its first call. As with any spawn start, a script that
scores must keep its entry point under `if __name__ == "__main__":`.

Protocol, one duplex pipe per worker: the worker sends "ready" once it runs; the parent sends
(pickled score_one, prompt, response, metadata) and the worker answers with an `Outcome`, or
None from the parent asks it to exit. The call timeout starts when the call is sent to a ready
worker, so starting a replacement never counts against a call. A worker that does not become
ready within `startup_timeout_s`, or dies before it does, is a broken setup and raises.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from posttrain.environments.base import Outcome, ScoreOne, call_contained

Item = tuple[str, str, dict[str, Any]]  # (prompt, response, metadata)

_CONTEXT = multiprocessing.get_context("spawn")
DEFAULT_CALL_TIMEOUT_S = 10.0


def verifier_pool(num_workers: int, call_timeout_s: float | None) -> VerifierPool | None:
    """The pool behind an environment's `num_workers` and `call_timeout_s` options; None: score in-process.

    call_timeout_s=None means DEFAULT_CALL_TIMEOUT_S with workers. Setting it with num_workers=0 is an
    error rather than silently ignored: in-process calls cannot be bounded.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a whole number >= 0, got {num_workers!r}")
    if num_workers == 0:
        if call_timeout_s is not None:
            raise ValueError("call_timeout_s bounds calls in worker processes; it needs num_workers > 0")
        return None
    return VerifierPool(num_workers, DEFAULT_CALL_TIMEOUT_S if call_timeout_s is None else call_timeout_s)


class VerifierPool:
    """`num_workers` processes that run `score_one` calls in parallel, each within `call_timeout_s` seconds.

    Workers start on the first `map` and are reused across batches. `close()` (or leaving a
    `with` block, or garbage collection, or interpreter exit) stops them. Not thread-safe: call
    `map` from one thread at a time.
    """

    def __init__(self, num_workers: int, call_timeout_s: float, *, startup_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not 0 < call_timeout_s < float("inf"):
            raise ValueError(f"call_timeout_s must be a positive number of seconds, got {call_timeout_s}")
        self.num_workers = num_workers
        self.call_timeout_s = call_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []  # replaced in place, so the finalizer sees the live ones
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)

    def map(self, score_one: ScoreOne, items: Sequence[Item]) -> list[Outcome]:
        """One Outcome per item, in input order: "ok", "error", "timeout" or "crash"."""
        if not self._finalizer.alive:
            raise RuntimeError("this VerifierPool is closed")
        try:
            # Pickled once here: an unpicklable score_one is a wiring bug and raises in the parent.
            payload = pickle.dumps(score_one)
        except Exception as error:
            raise TypeError(
                f"{score_one!r} cannot be pickled for the worker processes; use a module-level function "
                f"(or functools.partial of one with plain arguments): {error}"
            ) from error
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.startup_timeout_s))
        outcomes: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        try:
            while pending or any(worker.index is not None for worker in self._workers):
                for slot, worker in enumerate(self._workers):
                    if worker.ready and worker.index is None and pending:
                        if worker.start_call(pending[0], payload, items[pending[0]], self.call_timeout_s):
                            pending.popleft()
                        else:  # it died while idle (e.g. the OOM killer): the call never ran, so no outcome
                            worker.kill()
                            self._workers[slot] = _Worker(self.startup_timeout_s)
                self._wait_and_collect(outcomes)
        except BaseException:
            # e.g. KeyboardInterrupt: busy workers would answer into the next batch, so stop them.
            for slot, worker in enumerate(self._workers):
                if worker.index is not None:
                    worker.kill()
                    self._workers[slot] = _Worker(self.startup_timeout_s)
            raise
        return outcomes  # type: ignore[return-value]  # every index got an outcome

    def _wait_and_collect(self, outcomes: list[Outcome | None]) -> None:
        """Wait for the next answer, death or deadline among the workers; record it, replace the dead."""
        active = [worker for worker in self._workers if not worker.ready or worker.index is not None]
        if not active:
            return
        timeout = max(0.0, min(worker.deadline for worker in active) - time.monotonic())
        wait([worker.conn for worker in active] + [worker.process.sentinel for worker in active], timeout)
        for slot, worker in enumerate(self._workers):
            if worker not in active:
                continue
            outcome = worker.poll()
            if outcome is None:
                continue
            if worker.index is None:  # it was starting
                raise RuntimeError(f"a verifier worker process failed to start: {outcome.detail}")
            outcomes[worker.index] = outcome
            worker.index = None
            worker.deadline = float("inf")
            if outcome.status in ("timeout", "crash"):
                self._workers[slot] = _Worker(self.startup_timeout_s)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Worker:
    """One worker process, the parent's end of its pipe, and the call it is running."""

    def __init__(self, startup_timeout_s: float) -> None:
        self.conn, child_conn = _CONTEXT.Pipe()
        # daemon: multiprocessing kills it at exit should no one close the pool (and a verifier cannot
        # start processes of its own through multiprocessing; subprocess works).
        self.process = _CONTEXT.Process(target=_worker_main, args=(child_conn,), daemon=True, name="posttrain-verifier")
        self.process.start()
        child_conn.close()  # the child holds its own copy; ours would hide the child's death (no EOF)
        self.ready = False
        self.index: int | None = None  # the item being scored
        self.deadline = time.monotonic() + startup_timeout_s  # for starting, then for each call

    def start_call(self, index: int, payload: bytes, item: Item, call_timeout_s: float) -> bool:
        """Send one call; False if the worker is gone (the caller requeues the item)."""
        try:
            self.conn.send((payload, *item))
        except OSError:  # BrokenPipeError: it died since its last answer
            return False
        self.index = index
        self.deadline = time.monotonic() + call_timeout_s
        return True

    def poll(self) -> Outcome | None:
        """The running call's outcome if there is one by now, or a failure to start; None otherwise.

        A worker that died gives a "crash"; one past its deadline is killed and gives a "timeout".
        An answer that has already arrived counts, even if it is read after the deadline.
        """
        if self.conn.poll():
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the pipe closed: the process died
                return self._died()
            if message == "ready":
                self.ready = True
                self.deadline = float("inf")
                return None
            return message
        if not self.process.is_alive():
            return self._died()
        if time.monotonic() >= self.deadline:
            self.kill()
            return Outcome("timeout", detail="killed at the call timeout" if self.ready else "did not start in time")
        return None

    def _died(self) -> Outcome:
        self.kill()  # reaps it
        return Outcome("crash", detail=f"worker process died (exit code {self.process.exitcode})")

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


def _stop_workers(workers: list[_Worker]) -> None:
    """Ask idle workers to exit, kill the rest; reap them all (runs at close, collection or exit)."""
    for worker in workers:
        if worker.process.is_alive() and worker.ready and worker.index is None:
            try:
                worker.conn.send(None)
            except OSError:
                pass
    deadline = time.monotonic() + 1.0
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
    workers.clear()


def _worker_main(conn: Connection) -> None:
    """A worker's loop: run calls until the parent sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent exited
            return
        if message is None:
            return
        payload, prompt, response, metadata = message
        # Unpickled inside the contained call: a verifier module the worker cannot import is an "error".
        outcome = call_contained(functools.partial(_call_pickled, payload), prompt, response, metadata)
        conn.send(dataclasses.replace(outcome, exception=None))  # exceptions may not pickle; detail has the traceback


def _call_pickled(payload: bytes, prompt: str, response: str, metadata: dict[str, Any]) -> float:
    return pickle.loads(payload)(prompt, response, metadata)


def _exit_with_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (killed without closing the pool), even in the middle of a hung call."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)
