"""Passes for tests/test_distributed.py: the rank named by FLEXC_TEST_KILL_RANK dies (SIGKILL) in them, or in the
anneal or recover after them (after step FLEXC_TEST_KILL_STEP)."""

from __future__ import annotations

import os
import signal

from flexc.passes.base import Pass, PassResult
from flexc.utils.distributed import rank


def _doomed() -> bool:
    return os.environ.get("FLEXC_TEST_KILL_RANK") == str(rank())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after_step():
    """A training pass's ``on_step`` hook that kills this process after step FLEXC_TEST_KILL_STEP."""
    kill_step = int(os.environ["FLEXC_TEST_KILL_STEP"])
    return staticmethod(lambda step, *_: step == kill_step and _die())


class KillRank(Pass):
    name = "kill_rank"

    def run(self, graph, ctx):
        if _doomed():
            _die()
        return PassResult(graph=graph, modified=False)


class KillInAnneal(Pass):
    name = "kill_in_anneal"

    def run(self, graph, ctx):
        from flexc.passes.anneal import Anneal

        if _doomed():
            Anneal.on_step = _die_after_step()
        return PassResult(graph=graph, modified=False)


class KillInRecover(Pass):
    name = "kill_in_recover"

    def run(self, graph, ctx):
        from flexc.passes.recover import Recover

        if _doomed():
            Recover.on_step = _die_after_step()
        return PassResult(graph=graph, modified=False)
