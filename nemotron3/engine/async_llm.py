"""AsyncLLM: the engine loop on a background thread, one async iterator of deltas per request.

For servers: many coroutines call `generate` concurrently; their requests are batched together by the
one engine. Leaving the `async for` early (client disconnect, task cancellation) aborts the request and
returns its cache to the pools. An exception inside a step fails the requests of that step's batch with
that error and the loop keeps serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator

from nemotron3.engine.engine import LLMEngine
from nemotron3.engine.llm import _delta
from nemotron3.engine.outputs import RequestOutput
from nemotron3.engine.sampling_params import SamplingParams


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards the engine: add/abort from the event loop, step from the thread
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._holds = 0  # open holding() blocks: the loop takes no step meanwhile
        self._thread = threading.Thread(target=self._run, name="nemotron3-engine", daemon=True)
        self._thread.start()

    async def generate(
        self, prompt: str | dict | list[int], params: SamplingParams | None = None, request_id: str | None = None,
        fork_of: str | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Yield RequestOutputs holding only what is new since the previous one; the last has finished=True.

        Invalid requests raise ValueError before anything is yielded. fork_of: LLMEngine.add_request's (a request
        with the same prompt whose cache this one may copy instead of prefilling).
        """
        if self._closed:
            raise RuntimeError("AsyncLLM is shut down")
        rid = request_id or f"req-{next(self._ids)}"
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(rid, prompt, params, fork_of=fork_of)
            self._queues[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        sent: dict[int, tuple[int, int]] = {}
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield _delta(item, sent)
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    @contextlib.contextmanager
    def holding(self):
        """While held, the engine loop takes no new step, so requests added meanwhile start in the same step: a
        server's n samples of one prompt arrive as n requests, and the later ones can fork the first one's prefill
        (fork_of) only if it has not run yet. Hold for an event-loop turn, not longer: nothing decodes meanwhile."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop thread
    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                busy = self.engine.has_unfinished_requests() and not self._holds
                if busy:
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # fail the requests in flight, keep serving
                        outputs = []
                        for rid in list(self.engine.requests):
                            self.engine.abort(rid)
                            self._send(rid, RuntimeError(f"engine step failed: {e!r}"))
            if not busy:
                self._wake.wait()
                self._wake.clear()
                continue
            for out in outputs:
                self._send(out.request_id, out)

    def _send(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)
