"""The exactly-once protocol between hosts: leases on chunks (leases.py), the heartbeat that
renews them (heartbeat.py) and partial progress of a chunk that the next holder resumes from
(partial.py). See docs/protocol.md.
"""
