"""What one run of the worker did (`kdgen run`'s last line, the progress line, the API's result).
The worker loop's threads update it only through its methods, under its own lock."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kdgen.views.progress import unknown_token_warning


@dataclass
class Summary:
    chunks_total: int = 0
    chunks_done_before: int = 0  # finished by earlier runs or other hosts when we started
    chunks_committed: int = 0  # by this process
    chunks_lost_race: int = 0  # finished (or dropped) here, but another host had stored it first
    backups_stored: int = 0  # of chunks_committed: backup copies of chunks other hosts held (the tail)
    rows: int = 0
    rows_reused: int = 0  # of `rows`: finished by an earlier holder of their chunk, read from OUT/_partial
    error_rows: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    unknown_prompt_tokens: int = 0  # of prompt_tokens: the tokenizer's unknown token (TOKENIZER_PATH)
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def add_generated(self, tokens: int) -> None:
        with self.lock:
            self.generated_tokens += tokens

    def add_lost_race(self) -> None:
        with self.lock:
            self.chunks_lost_race += 1

    def add_committed(self, *, backup: bool, rows: int, reused: int, errors: int, samples: int,
                      prompt_tokens: int, unknown_tokens: int) -> None:
        """A chunk object this process created (`rows` counts its error rows too)."""
        with self.lock:
            self.chunks_committed += 1
            self.backups_stored += backup
            self.rows += rows - errors
            self.rows_reused += reused
            self.error_rows += errors
            self.samples += samples
            self.prompt_tokens += prompt_tokens
            self.unknown_prompt_tokens += unknown_tokens

    def set_elapsed(self, seconds: float) -> None:
        with self.lock:
            self.elapsed_s = seconds

    def line(self) -> str:
        rate = self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"done: {self.chunks_committed} chunks committed here"
            f"{f' ({self.backups_stored} as backup copies)' if self.backups_stored else ''} ({self.chunks_done_before} were already "
            f"done, {self.chunks_total} in plan), {self.rows} rows ({self.rows_reused} reused from partial progress), "
            f"{self.error_rows} error rows, "
            f"{self.samples} samples, {self.generated_tokens} generated tokens in {self.elapsed_s:.1f} s "
            f"({rate:.0f} tok/s)" + unknown_token_warning(self.unknown_prompt_tokens, self.prompt_tokens))
