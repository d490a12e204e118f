"""kdgen."""
