"""The committer: stores finished chunks off the engine thread, each as one create of its chunk
object (records and error rows together), then ends its custody (kdgen.worker.custody)."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable

from kdgen.config import JobConfig
from kdgen.fleet import partial
from kdgen.records import builders, chunk_object
from kdgen.worker.summary import Summary
from kdgen.worker.work import ChunkWork

log = logging.getLogger(__name__)


class Committer:
    """Commits finished chunks off the engine thread; surfaces the first failure."""

    def __init__(self, c: JobConfig, summary: Summary, rescue: Callable[[ChunkWork], object] | None,
                 unk_id: int | None = None):
        """rescue(work): saves a chunk's finished rows to OUT/_partial when its commit fails;
        unk_id: the tokenizer's unknown token, counted in prompts."""
        self.c, self.s, self.rescue, self.unk_id = c, summary, rescue, unk_id
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kdgen-commit")
        self.futures: list[Future] = []

    def submit(self, work: ChunkWork) -> None:
        self.futures.append(self.pool.submit(self.commit, work))

    def pending(self) -> int:
        """Commits not finished yet."""
        return sum(not f.done() for f in self.futures)

    def commit(self, work: ChunkWork) -> None:
        try:
            created, n_errors, samples, prompt_tokens, reused = self._store(work)
        except BaseException:
            self._hand_back(work)  # its lease must not wait out its TTL while others idle
            raise
        chunk = work.chunk
        work.custody.committed(created)
        if created and (work.attempt > 1 or work.quarantined):
            partial.record_faults(self.c.output_path, chunk.name, work.attempt, work.quarantined)
        if not created:
            self.s.add_lost_race()
            log.info("%s was already stored by another host; kept that copy", chunk.name)
            return
        unknown = 0
        if self.unk_id is not None:
            unknown = sum(p.token_ids.count(self.unk_id) for i, p in enumerate(work.prompts) if i in work.results)
        self.s.add_committed(backup=work.backup, rows=len(work.prompts), reused=reused, errors=n_errors,
                             samples=samples, prompt_tokens=prompt_tokens, unknown_tokens=unknown)

    def _store(self, work: ChunkWork):
        chunk, records, errors = work.chunk, [], []
        samples = prompt_tokens = reused = 0
        for i, p in enumerate(work.prompts):
            f = work.results.get(i)
            row = work.cached.get(i)
            if row is not None and row.error is None:  # finished by an earlier holder (OUT/_partial)
                records.extend(row.records)
                samples += row.samples
                prompt_tokens += row.prompt_tokens
                reused += 1
                continue
            if row is not None:
                p.error = row.error  # quarantined by an earlier holder (audit.error_kind knows it by its text)
                p.error_kind = "quarantined" if row.error.startswith(partial.QUARANTINE_PREFIX) else p.error_kind
            if f is not None and f.error is not None:  # refused by the endpoint (4xx)
                p.error = f.error
            if p.error is not None:
                errors.append(builders.error_record(chunk, p))
                records.extend(builders.records(self.c, chunk, p, None))
                continue
            records.extend(builders.records(self.c, chunk, p, f))
            samples += len(f.samples)
            prompt_tokens += len(p.token_ids)
        created = chunk_object.commit_chunk(self.c, chunk, records, errors)
        return created, len(errors), samples, prompt_tokens, reused

    def _hand_back(self, work: ChunkWork) -> None:
        try:
            if self.rescue is not None:
                self.rescue(work)
        except Exception as e:
            log.warning("could not save the finished rows of %s: %s", work.chunk.name, e)
        work.custody.hand_back()

    def check(self) -> None:
        still = []
        for f in self.futures:
            if f.done():
                f.result()  # raises the commit's error
            else:
                still.append(f)
        self.futures = still

    def drain(self) -> None:
        """Wait for every commit (each ends its chunk's custody, also when it fails), then raise
        the first failure."""
        wait(self.futures)
        self.pool.shutdown()
        for f in self.futures:
            f.result()
        self.futures = []
