"""A pass for tests/test_distributed.py: the rank named by FLEXC_TEST_KILL_RANK dies (SIGKILL) in it."""

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
