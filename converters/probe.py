"""Score candidate conventions by the next-token loss of the converted model on a probe text.

One streaming pass over the layers of the converted HF tensors (numpy, float32): each layer's
tensors are read once, one tensor at a time, and applied to one hidden-state stream per
candidate. Candidates differ only in q/k (rotary layout, query scale), the rotary frequencies
(rope scaling) and the tied head's scale, so q/k/lm_head come "raw" and each candidate's
convention is applied to the projections' outputs (a permutation within each head and a scale),
never to a copy of the weights. Memory: one float32 tensor (the head in bands of rows) plus
C x T x max(E, M) activations.
"""

from __future__ import annotations

import math
import os
import re
from typing import Callable

import numpy as np

from converters import ConvertError
from converters.conventions import Convention
from converters.sizes import Dims

# Varied plain English for real models (a probe needs text a language model predicts well, and
# enough of it: the decision rule in conventions.judge needs differences above their measured
# spread). Eight documents of different kinds, each scored as its own sequence (~1000 tokens for a
# Llama 3 tokenizer). An in-domain --probe-text is better still.
BUILTIN_DOCS = (
    "The town sits on the east bank of a slow river, and most of its people have lived there all their "
    "lives. Every morning the baker opens his shop at six, and by seven there is a line of workers waiting "
    "for bread and coffee. Children walk to the school on the hill, where the teachers have taught the "
    "same lessons for many years. In the afternoon the market fills with farmers who bring vegetables, "
    "eggs and cheese from the villages nearby. When the sun goes down, families sit outside their houses "
    "and talk about the weather, the price of food and the news from the city. It is a quiet place, but "
    "the people like it that way, and few of them would ever want to leave.",
    "To make a simple tomato soup, you will need four large tomatoes, one onion, two cloves of garlic, a "
    "tablespoon of olive oil, two cups of vegetable stock, salt and pepper. First, chop the onion and the "
    "garlic. Heat the oil in a large pot over medium heat, add the onion and cook it for five minutes, "
    "until it is soft. Add the garlic and cook for one more minute. Then add the chopped tomatoes and the "
    "stock, bring the soup to a boil, and let it simmer for twenty minutes. Blend the soup until it is "
    "smooth, season it with salt and pepper, and serve it hot with a slice of fresh bread.",
    "Water boils at a lower temperature on a high mountain than it does at sea level. The reason is air "
    "pressure. At sea level, the weight of the air above pushes down on the surface of the water, and the "
    "molecules need more energy to escape as steam. Higher up, there is less air above, so the pressure is "
    "lower and the water boils sooner. This is why cooking takes longer in the mountains: the water is "
    "boiling, but it is not as hot. Pressure cookers work the other way around. They trap the steam, raise "
    "the pressure inside the pot, and let the water get hotter before it boils.",
    "The city council voted on Tuesday to approve a new plan for public transport. Under the plan, three "
    "new bus lines will connect the northern suburbs with the central station, and trains will run every "
    "ten minutes during the morning and evening rush hours. The project is expected to cost about two "
    "hundred million dollars over the next five years. Supporters say the changes will reduce traffic and "
    "air pollution, while some residents worry about the noise of construction. The first new line is "
    "scheduled to open next spring.",
    "\"Are you coming to the game on Saturday?\" Anna asked. \"I would like to,\" said Tom, \"but I have to "
    "help my father move some furniture in the morning.\" \"The game does not start until three o'clock,\" "
    "she said. \"You could come after you finish.\" Tom thought about it for a moment. \"All right. If we "
    "are done by two, I will meet you at the gate.\" \"Good,\" said Anna. \"I will save you a seat, and "
    "don't forget to bring a jacket. It gets cold when the sun goes down.\"",
    "In the early years of the nineteenth century, most people in Europe still lived in small villages and "
    "worked on farms. The arrival of the steam engine changed that within a few decades. Factories were "
    "built near rivers and coal mines, and workers moved to the growing cities in search of jobs. Railways "
    "made it possible to carry goods and people over long distances in a single day. Life in the new "
    "industrial towns was often hard: the hours were long, the pay was low, and the streets were crowded "
    "and dirty. Over time, new laws limited child labour and improved working conditions.",
    "A computer program is a list of instructions that tells a computer what to do. The instructions are "
    "written in a programming language, such as Python or C, and then translated into a form the machine "
    "can run. A simple program might read a list of numbers from a file, add them together, and print the "
    "result. Programmers often make mistakes, which are called bugs. To find them, they run the program "
    "on small examples, compare the output with the answer they expect, and read the code line by line. "
    "Good programs are easy to read, because people will have to change them later.",
    "Dear Mr. Johnson, thank you for your letter of March the fourth. I am sorry to hear that the order "
    "you placed with us last month arrived late and that one of the chairs was damaged. We have arranged "
    "for a new chair to be sent to you this week, at no extra cost. Our driver will call you the day before "
    "to agree on a time for the delivery. Please keep the damaged chair until then, and he will take it "
    "away. We value your custom and hope that you will be happy with the furniture. Yours sincerely, "
    "Margaret Hill, Customer Service Manager.",
)
BUILTIN_TEXT = "\n\n".join(BUILTIN_DOCS)
MIN_TOKENS = 16
MAX_TOKENS = 512  # per sequence
MAX_DOCS = 16
VOCAB_BAND_ROWS = 8192


def tokenize(tokenizer_dir: str, text: str) -> list[int]:
    """Token ids of text as the tokenizer itself encodes it (its post-processor adds BOS if it says so)."""
    tj = os.path.join(tokenizer_dir, "tokenizer.json")
    try:
        if os.path.exists(tj):
            from tokenizers import Tokenizer

            return Tokenizer.from_file(tj).encode(text).ids
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"])
    except Exception as e:  # noqa: BLE001 - tokenizers/transformers raise many kinds
        raise ConvertError(f"cannot tokenize the probe text with {tokenizer_dir}: {str(e).splitlines()[0]}") from None


def probe_tokens(tokenizer_dir: str, probe_text: str | None, vocab: int, flag: str = "--probe-text"
                 ) -> tuple[list[list[int]], str]:
    """(token id sequences, what they are) for the built-in paragraph or --probe-text FILE, whose
    blank-line separated paragraphs are scored as separate sequences (each from position 0)."""
    if probe_text:
        try:
            with open(probe_text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"{flag} {probe_text}: cannot read it: {e}") from None
        what = probe_text
    else:
        text, what = BUILTIN_TEXT, "the built-in English documents"
    docs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    seqs = [ids[:MAX_TOKENS] for ids in (tokenize(tokenizer_dir, doc) for doc in docs[:MAX_DOCS]) if len(ids) > 1]
    n = sum(len(x) - 1 for x in seqs)
    if n < MIN_TOKENS:
        raise ConvertError(f"{flag}: {what} gives only {n} tokens to predict; the probe needs at least {MIN_TOKENS}")
    top = max(max(x) for x in seqs)
    if top >= vocab:
        raise ConvertError(f"{flag}: {what} tokenizes to id {top}, beyond the model's {vocab} embedding rows")
    return seqs, f"{n} predicted tokens in {len(seqs)} sequence(s) of {what}"


def inv_freq(head_dim: int, theta: float, rope_scaling: str) -> np.ndarray:
    """HF/MaxText rotary frequencies; llama3: MaxText LLaMARotaryEmbedding._apply_scaling_factor
    (factor 8, low 1, high 4, original context 8192), the same as HF's rope_type llama3."""
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if rope_scaling == "llama3":
        wl = 2 * math.pi / freq
        low_wl, high_wl = 8192 / 1.0, 8192 / 4.0
        smooth = (8192 / wl - 1.0) / (4.0 - 1.0)
        mid = (1 - smooth) * freq / 8 + smooth * freq
        freq = np.where(wl < high_wl, freq, np.where(wl > low_wl, freq / 8, mid))
    return freq


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, D] half-split rotation (HF's rotate_half)."""
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _conv_heads(y: np.ndarray, D: int, conv: Convention, kind: str) -> np.ndarray:
    """Apply a convention to raw projection outputs y [T, heads*D] (what finalize_rows does to rows)."""
    T = y.shape[0]
    y = y.reshape(T, -1, D)
    if conv.rope_layout == "interleaved":
        y = y[:, :, np.r_[0:D:2, 1:D:2]]
    if kind == "q" and conv.query_scale == "fold":
        y = y * np.float32(math.sqrt(D))
    return y


def losses(get: Callable[[str, slice | None], np.ndarray], raw: set[str], d: Dims, seqs: list[list[int]],
           cands: list[Convention], tied: bool) -> dict[Convention, float]:
    """Mean next-token loss (nats/token) of each candidate (see token_losses)."""
    return {c: float(v.mean()) for c, v in token_losses(get, raw, d, seqs, cands, tied).items()}


# The forward is HF's Llama (half-split RoPE, attention scaled by 1/sqrt(head_dim), SiLU MLP,
# RMSNorm), or HF's Qwen3 (the same plus a per-head RMSNorm of q and k before RoPE, and for Qwen3
# MoE the routed experts of `_moe`), i.e. what transformers and vLLM will run.
def token_losses(get: Callable[[str, slice | None], np.ndarray], raw: set[str], d: Dims, seqs: list[list[int]],
                 cands: list[Convention], tied: bool) -> dict[Convention, np.ndarray]:
    """Next-token loss (nats) of each candidate at every predicted token of the sequences, in
    order (sequence by sequence). `get(name, rows)`
    returns the float32 HF tensor (rows: a slice of its first axis, or None for all); names in
    `raw` are raw. All sequences go through each tensor together (one matmul per tensor and
    layer); only RoPE positions and the causal attention are per sequence."""
    from converters.mapping import hf_name

    C, D = len(cands), d.head_dim
    bounds = np.cumsum([0] + [len(x) for x in seqs])
    tok = np.concatenate([np.asarray(x) for x in seqs])
    N = len(tok)
    pos = np.concatenate([np.arange(len(x), dtype=np.float64) for x in seqs])
    emb = np.stack([get("model.embed_tokens.weight", slice(int(t), int(t) + 1))[0] for t in tok])
    x = np.repeat(emb[None].astype(np.float32), C, axis=0)  # [C, N, E]
    rot = []
    for c in cands:
        ang = pos[:, None] * inv_freq(D, d.rope_theta, c.rope_scaling)[None]
        rot.append((np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[:, None, :]))
    eps = d.rms_norm_eps

    def proj(h: np.ndarray, name: str) -> np.ndarray:  # [C, N, in] @ W.T -> [C, N, out]
        w = get(name, None)
        out = (h.reshape(-1, h.shape[-1]) @ w.T).reshape(h.shape[0], h.shape[1], -1)
        del w
        return out

    for i in range(d.layers):
        n = lambda leaf: hf_name(leaf, i)  # noqa: E731
        h = _rms(x, get(n("pre_norm"), None), eps)
        q, k, v = proj(h, n("query")), proj(h, n("key")), proj(h, n("value"))
        if d.family != "llama":  # per-head RMSNorm of q and k before RoPE (raw with raw q/k: RMS ignores order)
            qn, kn = get(n("query_norm"), None), get(n("key_norm"), None)
            q = _rms(q.reshape(C, N, -1, D), qn, eps).reshape(C, N, -1)
            k = _rms(k.reshape(C, N, -1, D), kn, eps).reshape(C, N, -1)
        convs = [(c if n("query") in raw else _FINAL, c if n("key") in raw else _FINAL) for c in cands]
        att = _attention(q, k, v, convs, rot, bounds, d)
        x = x + proj(att, n("out"))
        h = _rms(x, get(n("post_norm"), None), eps)
        if d.family == "qwen3_moe":
            x = x + _moe(get, i, h, d)
            del q, k, v, att, h
            continue
        g = proj(h, n("wi_0"))
        g = g / (1 + np.exp(-g)) * proj(h, n("wi_1"))
        x = x + proj(g, n("wo"))
        del q, k, v, att, g, h
    h = _rms(x, get("model.norm.weight", None), eps).reshape(C * N, -1)
    return _head_losses(get, h, "lm_head.weight" in raw, d, seqs, cands)


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, convs: list[tuple[Convention, Convention]],
               rot: list, bounds: np.ndarray, d: Dims) -> np.ndarray:
    """Causal attention of every candidate ([C, N, heads*D] projections; convs: the convention to
    apply to each candidate's q and k), each sequence on its own: [C, N, heads*D]."""
    C, N, D = q.shape[0], q.shape[1], d.head_dim
    group = d.heads // d.kv_heads
    att = np.empty((C, N, d.heads * D), dtype=np.float32)
    for ci, (cq, ck) in enumerate(convs):
        qc = _rope_half(_conv_heads(q[ci], D, cq, "q"), *rot[ci])
        kc = _rope_half(_conv_heads(k[ci], D, ck, "k"), *rot[ci])
        kc = np.repeat(kc, group, axis=1)
        vc = np.repeat(v[ci].reshape(N, d.kv_heads, D), group, axis=1)
        for s0, s1 in zip(bounds[:-1], bounds[1:]):
            T = s1 - s0
            s = np.einsum("thd,shd->hts", qc[s0:s1], kc[s0:s1]) / np.float32(math.sqrt(D))
            s += np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            att[ci, s0:s1] = np.einsum("hts,shd->thd", s, vc[s0:s1]).reshape(T, -1)
    return att


def _head_losses(get, h: np.ndarray, head_raw: bool, d: Dims, seqs: list[list[int]], cands: list[Convention]
                 ) -> dict[Convention, np.ndarray]:
    """Per-token losses from the final hidden states h [C * N, E]: the head in bands of vocab rows,
    with a running log-sum-exp and the target logits."""
    C = len(cands)
    N = h.shape[0] // C
    lse = np.full(C * N, -np.inf)
    target = np.zeros(C * N)
    nxt = np.concatenate([np.append(np.asarray(sq)[1:], -1) for sq in seqs])  # -1: after a sequence
    t = np.tile(nxt, C)
    scale = np.array([1 / math.sqrt(d.emb) if (head_raw and c.normalize == "true") else 1.0
                      for c in cands], dtype=np.float64).repeat(N)
    for r0 in range(0, d.vocab, VOCAB_BAND_ROWS):
        r1 = min(d.vocab, r0 + VOCAB_BAND_ROWS)
        lg = (h @ get("lm_head.weight", slice(r0, r1)).T).astype(np.float64) * scale[:, None]
        m = np.maximum(lse, lg.max(1))
        lse = m + np.log(np.exp(lse - m) + np.exp(lg - m[:, None]).sum(1))
        hit = (t >= r0) & (t < r1)
        target[hit] = lg[hit, t[hit] - r0]
    per = (lse - target).reshape(C, N)[:, nxt >= 0]
    per = np.where(np.isfinite(per), per, np.inf)
    return {c: per[ci] for ci, c in enumerate(cands)}


def _moe(get, i: int, h: np.ndarray, d: Dims) -> np.ndarray:
    """HF Qwen3MoE's sparse block with norm_topk_prob (= MaxText's moe.py routing): top-k of the
    router logits, softmax over them, each expert's SwiGLU on its tokens; every expert tensor is
    read at most once, for all candidates' tokens together."""
    from converters.mapping import hf_name

    C, N, E = h.shape
    hf = h.reshape(C * N, E)
    logits = hf @ get(hf_name("moe_gate", i), None).T
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :d.experts_per_token]
    tl = np.take_along_axis(logits, top, -1)
    wts = np.exp(tl - tl.max(-1, keepdims=True))
    wts /= wts.sum(-1, keepdims=True)
    out = np.zeros_like(hf)
    for j in range(d.experts):
        rows, slot = np.nonzero(top == j)
        if len(rows):
            x = hf[rows]
            g = x @ get(hf_name("moe_wi_0", i, j), None).T
            g = g / (1 + np.exp(-g)) * (x @ get(hf_name("moe_wi_1", i, j), None).T)
            out[rows] += wts[rows, slot, None] * (g @ get(hf_name("moe_wo", i, j), None).T)
    return out.reshape(C, N, E)


# Convention applied to a tensor that is already final (nothing to do).
_FINAL = Convention(query_scale="none", rope_layout="half", rope_scaling="none", normalize="false")
