"""`kdgen export OUT --to FORMAT --dest DIR`: a job's committed chunk objects -> trainer-ready shards."""

from __future__ import annotations

from kdgen.cli.job_flags import BOOL

HELP = ("export a job's committed chunk objects as trainer-ready shards in DEST (local or gs://): "
        "--to maxtext-offline (ArrayRecord for MaxText offline distillation) or distillkit (DistillKit's "
        "top-k parquet), both from a `kdgen score --logprobs K` job or a generation job run with "
        "--logprobs K --prompt_logprobs; axolotl-kd (Axolotl's tokenized KD rows, from a generation job "
        "run with --logprobs K); messages (chat jobs: role/content plus TRL's prompt/completion), text "
        "(prefix-mode jobs: text, prompt, completion), both --file_format jsonl|parquet; or parquet "
        "(compacted records). See docs/outputs.md. A job with missing chunks is refused unless "
        "--allow_partial. Resumable and idempotent: a rerun writes only missing shards")


def register(commands) -> None:
    from kdgen.export.shards import TARGETS

    p = commands.add_parser("export", help="a job's chunk objects -> trainer-ready shards", description=HELP)
    p.add_argument("output_path", help="the job's output directory (local or gs://)")
    p.add_argument("--to", default="", metavar="FORMAT", help="|".join(TARGETS))
    p.add_argument("--dest", default="", help="where the shards go (local or gs://)")
    p.add_argument("--shard_mb", "--shard-mb", type=float, default=256.0,
                   help="about that many MB of chunk objects per shard (default 256)")
    p.add_argument("--allow_partial", "--allow-partial", **BOOL, help="export a job with missing chunks")
    p.add_argument("--file_format", "--file-format", default="jsonl", help="messages/text: jsonl|parquet")
    p.add_argument("--dataset_path", "--dataset-path", default="",
                   help="the corpus (default: the one pinned in OUT/_job.json)")
    p.set_defaults(func=export)


def export(args) -> None:
    from kdgen.export import shards
    from kdgen.export.shards import TARGETS

    if not args.to or not args.dest:
        raise ValueError(f"kdgen export OUT --to {'|'.join(TARGETS)} --dest DIR")
    summary = shards.export(args.output_path, args.to, args.dest, shard_mb=args.shard_mb,
                            allow_partial=args.allow_partial, file_format=args.file_format,
                            dataset_path=args.dataset_path or None)
    print(summary.line(args.dest))
