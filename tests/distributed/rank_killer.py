"""Passes for tests/test_distributed.py: the rank named by FLEXC_TEST_KILL_RANK dies (SIGKILL) in them, or in the
anneal or recover after them."""

from __future__ import annotations

import os
import signal

from flexc.passes.base import Pass, PassResult
from flexc.utils.distributed import rank


class KillRank(Pass):
    name = "kill_rank"

    def run(self, graph, ctx):
        if os.environ.get("FLEXC_TEST_KILL_RANK") == str(rank()):
            os.kill(os.getpid(), signal.SIGKILL)
        return PassResult(graph=graph, modified=False)


class KillInAnneal(Pass):
    """The rank named by FLEXC_TEST_KILL_RANK dies (SIGKILL) after step FLEXC_TEST_KILL_STEP of the next anneal."""

    name = "kill_in_anneal"

    def run(self, graph, ctx):
        from flexc.passes.anneal import Anneal

        if os.environ.get("FLEXC_TEST_KILL_RANK") == str(rank()):
            kill_step = int(os.environ["FLEXC_TEST_KILL_STEP"])
            Anneal.on_step = staticmethod(lambda step: step == kill_step and os.kill(os.getpid(), signal.SIGKILL))
        return PassResult(graph=graph, modified=False)


class KillInRecover(Pass):
    """The rank named by FLEXC_TEST_KILL_RANK dies (SIGKILL) after step FLEXC_TEST_KILL_STEP of the next recover."""

    name = "kill_in_recover"

    def run(self, graph, ctx):
        from flexc.passes.recover import Recover

        if os.environ.get("FLEXC_TEST_KILL_RANK") == str(rank()):
            kill_step = int(os.environ["FLEXC_TEST_KILL_STEP"])
            Recover.on_step = staticmethod(
                lambda step, model: step == kill_step and os.kill(os.getpid(), signal.SIGKILL))
        return PassResult(graph=graph, modified=False)
