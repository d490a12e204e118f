"""Saving the finished rows of the chunks this process works on as partial segments
(kdgen.fleet.partial), off the engine thread: every CHECKPOINT_EVERY_S per chunk, after an engine
death, before a group of suspect rows runs alone, when a commit fails, and when the worker stops."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, wait

from kdgen.corpus.dataset import Chunk
from kdgen.engines.base import Finished
from kdgen.fleet import partial
from kdgen.prompts import Prompt
from kdgen.records import builders
from kdgen.worker.work import ChunkWork

log = logging.getLogger(__name__)


class PartialSaves:
    def __init__(self, c, saver: partial.Saver):
        self.c, self.saver = c, saver

    def save(self, work: ChunkWork, sync: bool = False) -> Future | None:
        """Write a segment with the rows (and events) of `work` since its last one."""
        if work.segments is None or work.dropped or work.custody.lost:
            return None  # not started (or a backup copy), dropped, or another host holds it now
        items = [(work.prompts[i], work.results.get(i)) for i in work.unsaved]
        if not items and not work.segments.pending_events:
            return None
        work.unsaved, work.saved_at = [], time.monotonic()
        url, head = work.segments.next(work.attempt)
        c, chunk = self.c, work.chunk

        def write() -> bool:
            rows = [row_of(c, chunk, p, f) for p, f in items]
            return partial.write_segment(url, head, rows, chunk.name)

        fut = self.saver.submit(write)
        work.custody.note_save(fut)
        if sync:
            fut.result()
        return fut

    def due(self, works: list[ChunkWork], every_s: float) -> None:
        """Save the rows of each chunk taken up (or last saved) every_s ago or earlier. Per chunk,
        not all at once: a chunk that is stored within every_s of its take-up costs no segment
        (nor their listing and deletion after the commit), and a kill -9 still loses at most
        about every_s of any chunk's work."""
        now = time.monotonic()
        for work in works:
            if work.started and work.unsaved and now - work.saved_at >= every_s:
                self.save(work)

    def save_all(self, works: list[ChunkWork], timeout: float) -> int:
        """Save every unfinished chunk's rows; the number of its finished rows now in _partial."""
        futures, rows = [], 0
        for work in works:
            if not work.started:
                continue
            rows += len(work.results) + len(work.cached) + len(work.quarantined)
            f = self.save(work)
            if f is not None:
                futures.append(f)
        self.wait(futures, timeout, "%d partial saves did not finish in time")
        return rows

    @staticmethod
    def wait(futures: list[Future], timeout: float, late: str | None = None) -> None:
        done, not_done = wait(futures, timeout=max(timeout, 0.1))
        if not_done and late:
            log.warning(late, len(not_done))


def row_of(c, chunk: Chunk, p: Prompt, f: Finished | None) -> partial.Row:
    """A finished row as the chunk object will hold it (records in the job's format)."""
    h = partial.prompt_hash(p)
    if f is None or f.error is not None:  # quarantined, or refused by an endpoint (4xx)
        return partial.Row(p.row_idx, h, [], p.error if f is None else f.error)
    gen = sum(len(s.token_ids) for s in f.samples)
    return partial.Row(p.row_idx, h, builders.records(c, chunk, p, f), None, len(f.samples), gen, len(p.token_ids))
