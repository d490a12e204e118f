"""What each `kdgen export --to` target needs of a job, refused up front in one line, and the
names of its shard files. See docs/outputs.md ("Exports").
"""

from __future__ import annotations

TARGETS = ("maxtext-offline", "messages", "text", "distillkit", "axolotl-kd", "parquet")


class ExportError(ValueError):
    """The export cannot run as asked; the message says why and what to do."""


def has_full_topk(fp: dict) -> bool:
    """Every token of the job's records has the teacher's top-k (scored texts, or prompt and
    completion of a PROMPT_LOGPROBS generation job)."""
    return fp.get("logprobs", 0) > 0 and (fp.get("task", "generate") == "score" or bool(fp.get("prompt_logprobs")))


def check_target(fp: dict, to: str) -> None:
    task, k = fp.get("task", "generate"), fp.get("logprobs", 0)
    if to in ("maxtext-offline", "distillkit") and not has_full_topk(fp):
        raise ExportError(
            f"--to {to} needs the teacher's top-k at every token: export a `kdgen score --logprobs K` job or a "
            f"generation job run with --logprobs K --prompt_logprobs (this job is task {task!r} with logprobs {k}"
            f"{'' if task == 'score' else ' and no prompt top-k'})")
    if to == "axolotl-kd" and (task == "score" or k <= 0):
        raise ExportError(f"--to axolotl-kd needs a generation job run with --logprobs K (this job is task {task!r} "
                          f"with logprobs {k}); scored texts: use --to distillkit or maxtext-offline")
    if to == "axolotl-kd" and fp.get("output_format") == "conversations" and not fp.get("prompt_logprobs"):
        raise ExportError("--to axolotl-kd needs token ids, which conversations records keep only with "
                          "--prompt_logprobs; run the job with --prompt_logprobs or --output_format sequence_kd")
    if to in ("messages", "text") and task == "score":
        raise ExportError(f"--to {to} needs generated completions; this is a scoring job (use --to parquet, "
                          f"distillkit or maxtext-offline)")
    chat = fp.get("prompt_mode", "prefix") == "chat" or fp.get("output_format") == "conversations"
    if to == "messages" and not chat:
        raise ExportError("--to messages: this prefix-mode job continues raw text, not a chat; export it with "
                          "--to text (plain `text`, `prompt`, `completion` strings)")
    if to == "text" and chat:
        raise ExportError("--to text: this is a chat job; export it with --to messages")
    if to == "messages" and fp.get("output_format") == "sequence_kd" and fp.get("messages_column"):
        raise ExportError("--to messages: sequence_kd records keep only the last user turn of a multi-turn "
                          "MESSAGES_COLUMN prompt; run the job with --output_format conversations to export them")


def shard_name(to: str, i: int, file_format: str) -> str:
    if to == "maxtext-offline":  # the names MaxText's save_top_k_teacher_logits.py gives its files
        return f"teacher_top_k_part_{i:05d}_host_000.array_record"
    return f"{to if to in ('messages', 'text', 'distillkit', 'axolotl-kd') else 'records'}-{i:05d}.{file_format}"
