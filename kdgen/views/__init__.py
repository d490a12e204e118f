"""What people see of a job: progress while it runs (progress.py), `kdgen status` and
`kdgen audit` over an output directory (status.py), and `kdgen show` of its records (show.py).
See docs/operations.md.
"""
