"""Requests waiting for a denoising loop, batched by what they must share.

Triton's own dynamic batcher stacks requests whatever their content, and an answer to a batch is
one error or none; a denoising loop can only take images of one size, step count and sampler, and a
bad request must not fail its neighbours. So the Triton model takes one request per execution
(several executions at once) and hands it here: a worker takes the oldest waiting request, waits
at most `max_delay_s` for others with the same `batch_key` until `max_images` are together, and
runs them as one loop; requests of another kind wait for the next loop, in arrival order. The caller
may give a finer key than `batch_key` (the server adds the prompt chunks, so that no prompt is padded
to a longer neighbour's context).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from sdrun.generation_request import batch_key
from sdrun.pipeline import GenerationRequest

RunLoop = Callable[[Sequence[GenerationRequest]], list]  # one result per request, in order


class LoopBatcher:
    def __init__(self, runs: Sequence[RunLoop], max_images: int, max_delay_s: float):
        """One worker thread per entry of `runs` (each its own pipeline, so loops run side by side)."""
        self.max_images, self.max_delay_s = max_images, max_delay_s
        self._pending: list[tuple[GenerationRequest, Future]] = []
        self._keys: dict[int, tuple] = {}  # id(future) -> the key its request is batched by
        self._ready = threading.Condition()
        self._closed = False
        self._workers = [threading.Thread(target=self._work, args=(run,), daemon=True, name=f"sdrun-loop-{i}")
                         for i, run in enumerate(runs)]
        for worker in self._workers:
            worker.start()

    def submit(self, request: GenerationRequest, key: tuple | None = None) -> Future:
        """Queue `request`; it shares loops with requests of the same `key` (None: its `batch_key`)."""
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the server is stopping")
            self._keys[id(future)] = batch_key(request) if key is None else key
            self._pending.append((request, future))
            self._ready.notify_all()
        return future

    def close(self) -> None:
        """Finish every waiting request, then stop the workers."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for worker in self._workers:
            worker.join()

    def _work(self, run: RunLoop) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            requests = [request for request, _ in group]
            try:
                results = run(requests)
            except Exception as err:  # the loop's failure is each of its requests' answer
                for _, future in group:
                    future.set_exception(err)
                continue
            for (_, future), result in zip(group, results):
                future.set_result(result)

    def _next_group(self) -> list[tuple[GenerationRequest, Future]] | None:
        with self._ready:
            while not self._pending:
                if self._closed:
                    return None
                self._ready.wait()
            deadline = time.monotonic() + self.max_delay_s
            while True:
                group = self._matching()
                remaining = deadline - time.monotonic()
                if sum(r.batch for r, _ in group) >= self.max_images or remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            for entry in group:
                self._pending.remove(entry)
                del self._keys[id(entry[1])]
            return group

    def _matching(self) -> list[tuple[GenerationRequest, Future]]:
        """The oldest request and the later ones of its kind that fit in one loop with it."""
        key = self._keys[id(self._pending[0][1])]
        group, images = [], 0
        for request, future in self._pending:
            if self._keys[id(future)] == key and images + request.batch <= self.max_images:
                group.append((request, future))
                images += request.batch
        return group
