"""The loop batcher: requests of one kind share a loop (up to the image limit), other kinds wait in order,
a failed loop fails only its own requests, and closing finishes what waits."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from sdrun.pipeline import GenerationRequest
from sdrun.serve.batcher import LoopBatcher

SMALL = GenerationRequest("a", steps=2, height=64, width=64, guidance=7.5, sampler="ddim")
LARGE = dataclasses.replace(SMALL, height=128)


class Recorder:
    """A loop that records its requests; blocks until released, so requests pile up."""

    def __init__(self):
        self.loops, self.release = [], threading.Event()

    def __call__(self, requests):
        self.release.wait(10)
        if any(r.prompt == "fail" for r in requests):
            raise RuntimeError("loop failed")
        self.loops.append([r.seed for r in requests])
        return [r.seed for r in requests]


def test_requests_of_one_kind_share_a_loop_and_other_kinds_keep_their_order():
    loop = Recorder()
    batcher = LoopBatcher([loop], max_images=3, max_delay_s=0.2)
    seeds = [(SMALL, 0), (LARGE, 1), (SMALL, 2), (SMALL, 3), (SMALL, 4), (LARGE, 5)]
    futures = [batcher.submit(dataclasses.replace(r, seed=s)) for r, s in seeds]
    loop.release.set()
    assert [f.result(10) for f in futures] == [s for _, s in seeds]
    batcher.close()
    assert loop.loops == [[0, 2, 3], [1, 5], [4]]


def test_a_given_key_keeps_requests_of_one_kind_apart():
    """The server keys by prompt chunks too: a short prompt is never padded to a long neighbour's context."""
    from sdrun.generation_request import batch_key

    loop = Recorder()
    batcher = LoopBatcher([loop], max_images=3, max_delay_s=0.2)
    futures = [batcher.submit(dataclasses.replace(SMALL, seed=s), (batch_key(SMALL), chunks))
               for s, chunks in ((0, 1), (1, 2), (2, 1))]
    loop.release.set()
    assert [f.result(10) for f in futures] == [0, 1, 2]
    batcher.close()
    assert loop.loops == [[0, 2], [1]]


def test_a_failed_loop_fails_its_requests_only():
    loop = Recorder()
    batcher = LoopBatcher([loop], max_images=2, max_delay_s=0.2)
    failing = [batcher.submit(dataclasses.replace(SMALL, prompt="fail", seed=s)) for s in (0, 1)]
    later = batcher.submit(dataclasses.replace(LARGE, seed=2))
    loop.release.set()
    for future in failing:
        with pytest.raises(RuntimeError, match="loop failed"):
            future.result(10)
    assert later.result(10) == 2
    batcher.close()


def test_close_finishes_waiting_requests_then_refuses_new_ones():
    loop = Recorder()
    loop.release.set()
    batcher = LoopBatcher([loop, loop], max_images=4, max_delay_s=5.0)
    futures = [batcher.submit(dataclasses.replace(SMALL, seed=s)) for s in range(2)]
    batcher.close()  # does not wait out the 5 s delay
    assert [f.result(0) for f in futures] == [0, 1]
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.submit(SMALL)
