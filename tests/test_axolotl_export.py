"""`kdgen export --to axolotl-kd`: a generation job's top-k as Axolotl's tokenized KD rows, read by
Axolotl's own KD collator and top-k forward-KL loss (axolotl from PyPI, `pip install --no-deps
axolotl`; its files are loaded by path because the package's `__init__` imports peft, which the
KD collator and loss do not need). Engine-free: the chunk objects are made by kdgen's writer from
a known "teacher" whose distribution of token t + 1 depends only on token t, so a student equal
to that teacher has zero KD loss exactly when every row sits where Axolotl's trainer uses it."""

from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdgen.export import shards
from kdgen.worker import runner
from kdgen.records import writer
from tests.conftest import job_config

V = K = 8  # k = vocabulary: the top-k is the whole distribution, so a perfect student has KL 0
TEACHER = np.log(np.random.default_rng(0).dirichlet(np.ones(V), size=V)).astype(np.float32)  # [prev, next]


def axolotl_module(name: str, rel: str):
    """One module file of the installed axolotl package, loaded by path (skips axolotl.integrations'
    __init__, which needs peft)."""
    spec = importlib.util.find_spec("axolotl")
    if spec is None:
        pytest.fail("axolotl is not installed: scripts/setup.sh installs it (pip install --no-deps axolotl==0.19.0)")
    path = os.path.join(os.path.dirname(spec.origin), rel)
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def record(rng: random.Random, row: int, conversations: bool) -> dict:
    """A generation record as kdgen writes it: completion token i drawn from top_*[i], the teacher's
    distribution after the token before it."""
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 6))]
    completion = [rng.randrange(V) for _ in range(rng.randint(1, 7))]
    ids = prompt + completion
    top_ids, top_lps = [], []
    for i in range(len(completion)):
        dist = TEACHER[ids[len(prompt) - 1 + i]]
        order = np.argsort(-dist)
        top_ids.append(order.tolist())
        top_lps.append(dist[order].tolist())
    lp = {"token_logprobs": [r[0] for r in top_lps], "top_token_ids": top_ids, "top_logprobs": top_lps}
    if conversations:  # token ids and the prompt's top-k: kept in metadata with PROMPT_LOGPROBS only
        p_rows = [TEACHER[t] for t in prompt[:-1]]
        p_ids = [[]] + [np.argsort(-d).tolist() for d in p_rows]
        p_lps = [[]] + [np.sort(d)[::-1].tolist() for d in p_rows]
        return {"id": f"r{row}", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "metadata": {"parquet_file": "f.parquet", "idx": row, "sample_idx": 0, **lp,
                             "prompt_token_ids": prompt, "completion_token_ids": completion,
                             "prompt_token_logprobs": [None] + [r[0] for r in p_lps[1:]],
                             "prompt_top_token_ids": p_ids, "prompt_top_logprobs": p_lps}}
    return {"parquet_file": "f.parquet", "row_idx": row, "prefix": "q", "generated": "a", "prompt_token_ids": prompt,
            "completion_token_ids": completion, "finish_reason": "length", "sample_idx": 0, **lp,
            "sampling": {"logprobs_mode": "raw", "logprobs": K}}


def generation_job(tmp_path, conversations: bool = False, logprobs: int = K) -> tuple[str, list[dict]]:
    """A committed generation job (two chunk objects, parquet) made with kdgen's writer."""
    from kdgen.corpus.dataset import Chunk
    from kdgen.prompts import input_columns

    data, out = tmp_path / "corpus", str(tmp_path / "out")
    data.mkdir()
    column = "prompt" if conversations else "text"  # the input column of each prompt mode
    pq.write_table(pa.table({column: [f"row {i}" for i in range(6)]}), str(data / "f.parquet"))
    chat = {"output_format": "conversations", "prompt_mode": "chat", "prompt_logprobs": True}
    c = job_config(model_path="m", dataset_path=str(data), output_path=out, chunk_size=3, logprobs=logprobs,
                   output_file_format="parquet", **(chat if conversations else {}))
    runner.prepare(c, input_columns(c))
    rng = random.Random(1)
    records = []
    for start in (0, 3):
        recs = [record(rng, r, conversations) for r in range(start, start + 3)]
        assert writer.commit_chunk(c, Chunk(str(data / "f.parquet"), "f", start, start + 3), recs, [])
        records += recs
    return out, records


@pytest.mark.parametrize("conversations", [False, True])
def test_axolotl_kd_rows_read_by_axolotls_collator_and_loss(tmp_path, conversations):
    import datasets
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    collator_mod = axolotl_module("axolotl_kd_collator", "integrations/kd/collator.py")
    loss_mod = axolotl_module("axolotl_kd_forward_kl", "integrations/kd/topk_logprob/forward_kl.py")
    out, records = generation_job(tmp_path, conversations)
    dest = str(tmp_path / "dest")
    assert shards.export(out, "axolotl-kd", dest).examples == 6
    ds = datasets.load_dataset("parquet", data_dir=dest, split="train")
    # axolotl/utils/data/wrappers.py _is_dataset_already_tokenized: these three columns -> used as they are
    assert {"input_ids", "attention_mask", "labels"} <= set(ds.features)
    assert set(ds.column_names) == {"input_ids", "labels", "attention_mask", "target_token_ids", "target_logprobs",
                                    "target_mask"}
    rows = ds.to_list()
    for r, rec in zip(rows, records):
        src = rec.get("metadata", rec)
        p, n = len(src["prompt_token_ids"]), len(src["completion_token_ids"])
        assert r["input_ids"] == src["prompt_token_ids"] + src["completion_token_ids"]
        assert r["labels"] == [-100] * p + src["completion_token_ids"]
        assert len(r["target_token_ids"]) == len(r["target_logprobs"]) == len(r["target_mask"]) == p + n
        assert r["target_token_ids"][p - 1:p - 1 + n] == src["top_token_ids"]
        assert [m[0] for m in r["target_mask"]] == [0] * (p - 1) + [1] * n + [0]

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                  pad_token="<pad>")
    batch = collator_mod.DataCollatorForKD(tokenizer=tok)([dict(r) for r in rows])
    L = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (6, L)
    assert batch["target_token_ids"].shape == batch["target_logprobs"].shape == batch["target_mask"].shape == (6, L, K)
    assert int(batch["target_mask"].sum()) == K * sum(len(rec.get("metadata", rec)["completion_token_ids"])
                                                      for rec in records)
    # Axolotl's trainer compares target row t with the student's output at position t: a student that
    # is the teacher has (float16-rounded) zero loss; the same student one position off does not.
    student = torch.from_numpy(TEACHER)[batch["input_ids"]]  # [B, L, V]: output at t = teacher after token t
    aligned = loss_mod.loss(student, batch["target_token_ids"], batch["target_logprobs"], batch["target_mask"])
    shifted = loss_mod.loss(torch.roll(student, 1, dims=1), batch["target_token_ids"], batch["target_logprobs"],
                            batch["target_mask"])
    assert abs(float(aligned)) < 1e-3 and float(shifted) > 0.05


def test_axolotl_kd_values_are_renormalized_topk_logprobs():
    """k < vocabulary: each row holds the stored top-k logprobs minus their log-sum-exp (Axolotl's
    loader renormalizes the k the same way); filler rows are Axolotl's own (ids 0..k-1, -inf, mask 0)."""
    lps = [[-0.5, -1.5, -3.0], [-0.1, -2.5, -4.0]]
    r = {"parquet_file": "f", "row_idx": 0, "prompt_token_ids": [5, 6], "completion_token_ids": [7, 8],
         "top_token_ids": [[7, 1, 2], [8, 3, 4]], "top_logprobs": lps}
    row = shards.axolotl_row(r, 3)
    assert row["target_token_ids"] == [[0, 1, 2], [7, 1, 2], [8, 3, 4], [0, 1, 2]]
    assert row["target_mask"] == [[0] * 3, [1] * 3, [1] * 3, [0] * 3]
    for got, want in zip(row["target_logprobs"][1:3], lps):
        assert np.allclose(got, np.array(want) - np.log(np.exp(want).sum()), atol=1e-6)
    assert row["target_logprobs"][0] == row["target_logprobs"][3] == [float("-inf")] * 3


def test_axolotl_kd_refuses_jobs_without_completion_topk(tmp_path):
    out, _ = generation_job(tmp_path, logprobs=0)
    with pytest.raises(shards.ExportError, match="--to axolotl-kd needs a generation job run with --logprobs K"):
        shards.export(out, "axolotl-kd", str(tmp_path / "dest"))
    assert not os.path.exists(tmp_path / "dest")
    with pytest.raises(shards.ExportError, match="--to axolotl-kd needs a generation job"):
        shards.check_target({"task": "score", "logprobs": 4}, "axolotl-kd")
    with pytest.raises(shards.ExportError, match="conversations records keep only with --prompt_logprobs"):
        shards.check_target({"task": "generate", "logprobs": 4, "output_format": "conversations"}, "axolotl-kd")
