"""Data parallel on one host: DATA_PARALLEL_SIZE engine processes, each a virtual host.

Rank r of host h runs as host h * DP + r of NUM_HOSTS * DP, on its own slice of the devices,
so the claim protocol that splits work between hosts also splits it between the engines of one
host: no new coordination code, and a rank that dies only loses its in-flight chunks.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from kdgen.config import RANK_ENV, ConfigError, JobConfig

log = logging.getLogger(__name__)



def device_env(platform: str, rank: int, dp: int, per_rank: int, env: dict) -> dict:
    """Environment that pins rank `rank` of `dp` to its devices (per_rank = TP * PP of them)."""
    if platform == "cuda":
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible:
            devices = [d for d in visible.split(",") if d]
        else:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        mine = devices[rank * per_rank:(rank + 1) * per_rank]
        if len(mine) < per_rank:
            raise ConfigError(f"--data_parallel_size needs {per_rank} GPUs per rank; only {len(devices)} visible")
        return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}
    if platform == "cpu":
        cores = sorted(os.sched_getaffinity(0))
        size = len(cores) // (per_rank * dp)
        if size < 1:
            raise ConfigError(f"--data_parallel_size: {len(cores)} CPU cores cannot hold that many engines")
        start = rank * per_rank * size
        groups = [cores[start + i * size:start + (i + 1) * size] for i in range(per_rank)]
        return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(f"{g[0]}-{g[-1]}" for g in groups)}
    raise ConfigError(f"--data_parallel_size > 1 is not supported on {platform}: run one process per host "
                      f"with --tensor_parallel_size over all its chips")


def run_ranks(c: JobConfig) -> int:
    """Start DATA_PARALLEL_SIZE copies of `kdgen run` and wait for them; the worst exit code.

    Each rank gets the parent's resolved settings as env vars, with its own host index."""
    import dataclasses

    from vllm.platforms import current_platform

    dp = c.data_parallel_size
    platform = current_platform.device_type
    per_rank = c.tensor_parallel_size * c.pipeline_parallel_size
    settings = {f.name.upper(): str(getattr(c, f.name)) for f in dataclasses.fields(c)}
    procs = []
    for rank in range(dp):
        env = {**os.environ, **settings, **device_env(platform, rank, dp, per_rank, os.environ),
               RANK_ENV: str(rank), "HOST_INDEX": str(c.host_index * dp + rank),
               "NUM_HOSTS": str(c.num_hosts * dp), "DATA_PARALLEL_SIZE": "1"}
        if os.environ.get("VLLM_CACHE_ROOT"):  # one compile cache per rank (kdgen.engines.compile_cache)
            env["VLLM_CACHE_ROOT"] = os.path.join(os.environ["VLLM_CACHE_ROOT"], f"dp{rank}")
        log.info("starting data-parallel rank %d/%d as host %s/%s", rank, dp, env["HOST_INDEX"], env["NUM_HOSTS"])
        procs.append(subprocess.Popen([sys.executable, "-m", "kdgen.cli", "run"], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        forward(signal.SIGINT, None)
        codes = [p.wait() for p in procs]
    finally:
        signal.signal(signal.SIGTERM, old)
    log.info("data-parallel ranks exited with %s", codes)
    return max(codes, key=abs)
