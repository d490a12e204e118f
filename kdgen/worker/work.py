"""The worker loop's unit: one chunk's prompts, their outcomes so far, what is left to send, and
the chunk's custody (kdgen.worker.custody: its lease and state)."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from kdgen.corpus.dataset import Chunk
from kdgen.engines.base import Finished
from kdgen.fleet import partial
from kdgen.fleet.leases import Lease
from kdgen.prompts import Prompt
from kdgen.worker.custody import Custody


@dataclass(eq=False)  # identity semantics: works are dict keys and deque members
class ChunkWork:
    chunk: Chunk
    custody: Custody
    prompts: list[Prompt]
    results: dict[int, Finished] = field(default_factory=dict)  # prompt index -> fresh result
    cached: dict[int, partial.Row] = field(default_factory=dict)  # prompt index -> row saved earlier
    pending: collections.deque = field(default_factory=collections.deque)  # prompt indices to send
    groups: list[list[int]] = field(default_factory=list)  # isolation: prompt indices to run alone
    outstanding: int = 0  # requests in the engine
    started: bool = False  # taken up by the loop (partial progress read, rows queued)
    isolating: bool = False
    quarantined: dict[int, str] = field(default_factory=dict)  # row_idx -> error record text
    history: partial.History = field(default_factory=partial.History)
    segments: partial.Segments | None = None
    unsaved: list[int] = field(default_factory=list)  # prompt indices finished since the last segment
    saved_at: float = 0.0  # time.monotonic() of the take-up or the last segment (periodic saves count from it)
    dropped: bool = False  # stored by another host meanwhile: its requests were aborted

    @property
    def lease(self) -> Lease | None:
        return self.custody.lease

    @property
    def backup(self) -> bool:
        """A copy of a chunk another host holds (kdgen.worker.feeder: the tail); no lease, no segments."""
        return self.custody.backup

    @property
    def attempt(self) -> int:
        return self.custody.attempt

    def wait_saves(self, timeout: float = 60.0) -> None:
        self.custody.wait_saves(timeout)

    @property
    def complete(self) -> bool:
        return self.started and not self.pending and not self.groups and self.outstanding == 0

    def unfinished(self) -> list[int]:
        return list(self.pending) + [i for g in self.groups for i in g]

    def note(self, event: dict) -> None:
        self.history.add(event)
        if self.segments is not None:
            self.segments.pending_events.append(event)


def finished_rows(work: ChunkWork) -> int:
    """Rows of the chunk with a result (fresh, or saved by an earlier holder): the proof, when a
    row then dies alone, that the engine and the settings work and the row is at fault."""
    fresh = sum(f.error is None for f in work.results.values())
    return fresh + sum(r.error is None for r in work.cached.values())
