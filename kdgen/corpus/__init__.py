"""The corpus: parquet discovery, footer-only planning into chunks, reading one chunk's rows
(dataset.py), and the job's pin of settings and corpus in OUT/_job.json (jobfile.py).
See docs/protocol.md.
"""
