"""The conventions a MaxText Llama checkpoint does not record, and how `auto` picks among them.

A flag set to `auto` makes every value of that option a candidate; the converter scores each
candidate by the next-token loss of the converted model on a probe text (converters/probe.py) and
keeps the clear winner (`choose`). The verifier judges a converted model with the same `judge`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np

from converters import ConvertError

# The options (CHOICES), and why each is open:
#     query_scale   fold | none         MaxText's init_query_w (layers/attentions.py) divides the query
#                                       kernel's init by sqrt(head_dim) and its attention applies no
#                                       1/sqrt(D) (attention_op.py: scale 1.0), so HF q_proj = query x
#                                       sqrt(D) ("fold"); a fork divides inside attention ("none").
#     rope_layout   interleaved | half  LLaMARotaryEmbedding (names "llama3.1*") rotates pairs (2i, 2i+1):
#                                       q/k are de-interleaved for HF; RotaryEmbedding (other names)
#                                       rotates (i, i + D/2) like HF: copied as they are.
#     rope_scaling  llama3 | none       LLaMARotaryEmbedding._apply_scaling_factor when rope_use_scale.
#     normalize     true | false        tied embeddings only (logits_via_embedding): decoders.py divides
#                                       the logits by sqrt(emb) when normalize_embedding_logits (default
#                                       true in configs/base.yml).
CHOICES = {
    "query_scale": ("fold", "none"),
    "rope_layout": ("interleaved", "half"),
    "rope_scaling": ("llama3", "none"),
    "normalize": ("true", "false"),
}
FLAGS = {"query_scale": "--query-scale", "rope_layout": "--rope-layout", "rope_scaling": "--rope-scaling",
         "normalize": "--normalize-embedding-logits"}
# "Clear" is measured, not assumed: the per-token loss differences between two candidates must
# average more than a floor (`margin`) and more than Z standard errors of their spread on this
# probe (`judge`); anything less is undecided, and an undecided probe never passes or picks anything.
DEFAULT_MARGIN = 0.02  # nats/token: the least mean difference ever taken as a decision
Z = 4.0  # ... and it must also exceed Z standard errors of the measured per-token differences
BLOCK_TOKENS = 16  # per-token differences are averaged in blocks (neighbouring tokens are correlated)
MAX_LOSS_FRACTION = 0.75  # of ln(vocab): a model whose best loss is above it does not predict the text
LOSS_CAP = 1e4  # per-token losses above this (overflow) count as this much in the statistics


@dataclasses.dataclass(frozen=True)
class Convention:
    query_scale: str
    rope_layout: str
    rope_scaling: str
    normalize: str = "true"  # only meaningful for tied embeddings

    def label(self, tied: bool = True) -> str:
        s = f"query_scale={self.query_scale} rope_layout={self.rope_layout} rope_scaling={self.rope_scaling}"
        return s + (f" normalize_embedding_logits={self.normalize}" if tied else "")

    def as_dict(self, tied: bool = True) -> dict:
        d = dataclasses.asdict(self)
        if not tied:
            d.pop("normalize")
        return d


def norm_bool(v) -> str | None:
    """Flags and library callers give bools or strings: 'true' | 'false' | 'auto' | None."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v).lower()


def candidates(tied: bool, **values: str) -> list[Convention]:
    """Every convention allowed by the flag values (each a choice or 'auto')."""
    axes = []
    for opt, allowed in CHOICES.items():
        v = values[opt]
        if opt == "normalize" and not tied:
            v = "true" if v == "auto" else v  # unused: no tied embeddings
        if v == "auto":
            axes.append(allowed)
        elif v in allowed:
            axes.append((v,))
        else:
            raise ConvertError(f"{FLAGS[opt]} must be one of {'|'.join(allowed)}|auto (got {v!r})")
    return [Convention(*c) for c in itertools.product(*axes)]


def max_loss(vocab: int, fraction: float = MAX_LOSS_FRACTION) -> float:
    return fraction * math.log(vocab)


@dataclasses.dataclass(frozen=True)
class Gap:
    """How much better `a` is than `b` on the probe: mean per-token loss of b minus a (nats/token),
    its standard error, and the threshold a decision needs: max(margin, Z x se)."""
    mean: float
    se: float
    threshold: float

    @property
    def decided(self) -> bool:
        return self.mean > self.threshold


def gap(a: np.ndarray, b: np.ndarray, margin: float = DEFAULT_MARGIN, z: float = Z) -> Gap:
    """Gap between two candidates' per-token losses (same tokens, same order)."""
    d = np.minimum(b, LOSS_CAP) - np.minimum(a, LOSS_CAP)
    blocks = np.array([x.mean() for x in np.array_split(d, max(2, len(d) // BLOCK_TOKENS)) if len(x)])
    se = float(blocks.std(ddof=1) / math.sqrt(len(blocks))) if len(blocks) > 1 else math.inf
    return Gap(float(d.mean()), se, max(margin, z * se))


@dataclasses.dataclass
class Judgement:
    """The probe's verdict on `chosen` (the converted convention, or for `auto` the best one):
    status "confirmed" (it beats every other candidate clearly), "wrong" (another beats it
    clearly: `rivals[0]`), "undecided" (`rivals`: the candidates it does not clearly beat) or
    "no_fit" (no candidate predicts the probe text)."""
    status: str
    chosen: Convention
    best: Convention
    means: dict
    rivals: list  # [(Convention, Gap)]; Gap of chosen over the rival (wrong: of the rival over chosen)
    limit: float

    def flags_apart(self) -> list[str]:
        """The flags in which the rivals differ from the chosen convention."""
        return [FLAGS[f] for f in CHOICES if any(getattr(c, f) != getattr(self.chosen, f) for c, _ in self.rivals)]


def judge(token_losses: dict[Convention, np.ndarray], vocab: int, chosen: Convention | None = None,
          margin: float = DEFAULT_MARGIN, max_loss_value: float | None = None, z: float = Z) -> Judgement:
    """Judge `chosen` (None: the candidate with the lowest mean loss) against every other candidate.
    A decision needs a mean per-token difference above both `margin` and z standard errors: a
    probe that cannot separate two candidates leaves them undecided, never passed."""
    means = {c: float(np.mean(np.minimum(v, LOSS_CAP))) for c, v in token_losses.items()}
    best = min(means, key=means.get)
    chosen = best if chosen is None else chosen
    limit = max_loss(vocab) if max_loss_value is None else max_loss_value
    if not means[best] < limit:
        return Judgement("no_fit", chosen, best, means, [], limit)
    others = [c for c in token_losses if c != chosen]
    better = [(c, gap(token_losses[c], token_losses[chosen], margin, z)) for c in others]
    better = [(c, g) for c, g in better if g.decided]
    if better:  # the one closest to chosen (fewest differing options), then the best
        better.sort(key=lambda cg: (sum(getattr(cg[0], f) != getattr(chosen, f) for f in CHOICES), means[cg[0]]))
        return Judgement("wrong", chosen, best, means, better, limit)
    rivals = [(c, gap(token_losses[chosen], token_losses[c], margin, z)) for c in others]
    rivals = sorted([(c, g) for c, g in rivals if not g.decided], key=lambda cg: cg[1].mean)
    return Judgement("undecided" if rivals else "confirmed", chosen, best, means, rivals, limit)


PROBE_ADVICE = ("pass --probe-text FILE with more text like the model's training data (blank-line separated "
                "documents; more tokens shrink the error)")


def choose(token_losses: dict[Convention, np.ndarray], vocab: int, tied: bool, margin: float = DEFAULT_MARGIN,
           max_loss_value: float | None = None) -> Convention:
    """The clear winner, or a one-line ConvertError saying why there is none and what to pass."""
    j = judge(token_losses, vocab, None, margin, max_loss_value)
    if j.status == "no_fit":
        lb = j.means[j.best]
        raise ConvertError(f"auto: no candidate predicts the probe text (best loss "
                           f"{lb:.3f} nats/token >= {j.limit:.3f}, uniform would be {math.log(vocab):.3f}): untrained "
                           "weights, a wrong tokenizer, a probe text unlike the model's training data or not a "
                           f"Llama; {PROBE_ADVICE}, or pass the conventions explicitly only if you know them")
    if j.status == "undecided":
        differ = j.flags_apart()
        second, g = j.rivals[0]
        raise ConvertError(f"auto: no clear winner: {j.best.label(tied)} has loss {j.means[j.best]:.3f} and "
                           f"{second.label(tied)} {j.means[second]:.3f} nats/token (apart by {g.mean:.3f}, a "
                           f"decision needs more than {g.threshold:.3f}: the margin {margin} or {Z:g} standard "
                           f"errors): the probe cannot tell {' / '.join(differ)} apart on this checkpoint; "
                           f"{PROBE_ADVICE}, or pass {' and '.join(differ)} explicitly")
    return j.best
