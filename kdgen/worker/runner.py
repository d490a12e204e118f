"""Running one host's share of a job: start-up checks, the pinned job file and plan, the engine,
then the worker loop (kdgen.worker.loop) over the chunks not finished yet. How the loop leases,
generates and commits: docs/protocol.md#the-worker-loop.
"""

from __future__ import annotations

import functools
import logging
import time

from kdgen import storage
from kdgen.config import JobConfig
from kdgen.corpus import dataset, jobfile
from kdgen.fleet.leases import owner_id
from kdgen.prompts import PromptBuilder, input_columns
from kdgen.records import chunk_object, naming
from kdgen.worker import preflight
from kdgen.worker.loop import JobError, WorkerLoop
from kdgen.worker.signals import sigterm_takes_the_children
from kdgen.worker.summary import Summary

__all__ = ["JobError", "Summary", "check_caches", "owner_id", "prepare", "run"]

log = logging.getLogger(__name__)


def prepare(c: JobConfig, builder_columns: dict[str, str], adopt: bool = False):
    """Create or check OUT/_job.json (settings, the pinned corpus, and for a new job the chunk
    layout) and return the job's plan; fails before any engine start. adopt: `kdgen adopt`
    (jobfile.prepare)."""
    storage.configure(deadline_s=c.storage_deadline_s)
    if not storage.is_remote(c.output_path) and c.num_hosts > 1:
        fstype = storage.local_fs_type(c.output_path)
        if fstype.startswith("fuse"):
            log.warning("OUTPUT_PATH %s is on a FUSE file system (%s): its exclusive creates and locks hold only "
                        "within this machine, so several hosts may store a chunk twice; give the hosts gs:// "
                        "directly (see README: where the guarantees stop)", c.output_path, fstype)
    return jobfile.prepare(c.output_path, c.fingerprint(), c.dataset_path, c.chunk_size, c.seed, c.limit,
                           columns=builder_columns, extend=c.extend, owner=owner_id(c),
                           extra={"layout": chunk_object.job_layout(c)}, adopt=adopt,
                           repin_after_s=None if adopt else c.lease_ttl_s)


def run(c: JobConfig, engine=None, tokenizer=None) -> Summary:
    """Run this host's share of the job to completion. Pass an engine to reuse one (tests, API)."""
    t0 = time.time()
    if engine is None:
        check_caches(c)
    storage.configure(deadline_s=c.storage_deadline_s)
    checked_tok = preflight.check(c, engine is not None, tokenizer is not None)  # refused before the pin
    plan = prepare(c, input_columns(c))
    done = naming.finished_chunk_names(c.output_path)
    order = [ch for ch in dataset.host_order(plan.chunks, c.host_index, c.num_hosts) if ch.name not in done]
    summary = Summary(chunks_total=len(plan.chunks), chunks_done_before=len(plan.chunks) - len(order))
    log.info("plan: %s; %d chunks already done; host %d/%d starts with %d chunks to visit",
             plan.summary(), summary.chunks_done_before, c.host_index, c.num_hosts, len(order))
    if not order:
        summary.set_elapsed(time.time() - t0)
        log.info("nothing to do: every chunk of the plan is in %s", c.output_path)
        return summary

    own_engine = engine is None
    if own_engine:
        from kdgen.engines.factory import make_engine

        with sigterm_takes_the_children():
            engine = make_engine(c)
    engine.set_sampling(c)
    current = [engine]  # the engine in use; in-process restarts replace it
    try:
        jobfile.mark_started(c.output_path, c.fingerprint(), owner_id(c), c.lease_ttl_s)
        tok = tokenizer or checked_tok
        wrap = _same
        if c.task == "score":
            from kdgen.score import ScoreBuilder, ScoringEngine

            builder = ScoreBuilder(c, tok, engine.max_model_len)
            wrap = functools.partial(ScoringEngine, c=c)
        else:
            builder = PromptBuilder(c, tok, engine.max_model_len)

        def restart():
            from kdgen.engines.factory import make_engine

            try:
                current[-1].close()
            except Exception:  # it is dead already
                pass
            new = make_engine(c)
            new.set_sampling(c)
            current.append(new)
            return wrap(new)

        in_process = own_engine and not c.endpoint  # the in-process engine: restart it after a death
        loop = WorkerLoop(c, wrap(engine), builder, order, summary, restart if in_process else None)
        return loop.run(t0)
    finally:
        if own_engine:
            current[-1].close()


def check_caches(c: JobConfig) -> None:
    """The caches this job will load from (the compile cache of an in-process engine, the local
    copy of a gs:// model or tokenizer) must be private: a settings error, before _job.json."""
    from kdgen.engines import compile_cache

    if not c.endpoint:
        compile_cache.use_rank_cache()
    if storage.is_remote(c.model_path) or storage.is_remote(c.tokenizer):
        compile_cache.private_dir(compile_cache.kdgen_cache())


def _same(engine):
    return engine
