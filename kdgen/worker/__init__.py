"""One host's worker: start-up checks (preflight.py), the loop that claims, generates and commits
(runner.py), the feeder that picks and reads the next chunk (feeder.py), the schedule of the
chunks it holds (schedule.py), and data-parallel ranks on one host (parallel.py).
"""
