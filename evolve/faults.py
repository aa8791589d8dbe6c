"""Fault injection for the crash tests: EVOMERGE_FAULT=KEY kills this process with SIGKILL at the point named KEY,
leaving the study as a crash would. Unset (always, outside the tests): no-op.

Points: `sigkill-after-submit:STUDY:N` (trial N of study STUDY went to a worker), `sigkill-after-rescore:STUDY:N`
(elite trial N's re-score was recorded), `sigkill-in-race:N:K` (chunk K of trial N's race was scored)."""

from __future__ import annotations

import os
import signal


def fault_point(key: str) -> None:
    """SIGKILL this process when EVOMERGE_FAULT equals `key`."""
    if os.environ.get("EVOMERGE_FAULT") == key:
        os.kill(os.getpid(), signal.SIGKILL)
