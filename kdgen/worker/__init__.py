"""One host's worker: start-up checks (preflight.py), the run of a job (runner.py) and its loop
(loop.py: engine steps, ticks, stopping), the feeder that picks, leases and reads the next chunk
(feeder.py) and hands it over (handoff.py), the custody of each chunk held (custody.py: the one
place that ends leases), the schedule of their rows (schedule.py, work.py), partial saves
(saves.py), commits (commit.py), signals and the watchdog (signals.py), the run's summary
(summary.py), and data-parallel ranks on one host (parallel.py).
"""
