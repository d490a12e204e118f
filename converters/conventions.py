"""The conventions a MaxText Llama checkpoint does not record, and how `auto` picks among them.

    query_scale   fold | none         MaxText's init_query_w (layers/attentions.py) divides the query
                                      kernel's init by sqrt(head_dim) and its attention applies no
                                      1/sqrt(D) (attention_op.py: scale 1.0), so HF q_proj = query x
                                      sqrt(D) ("fold"); a fork divides inside attention ("none").
    rope_layout   interleaved | half   LLaMARotaryEmbedding (names "llama3.1*") rotates pairs (2i, 2i+1):
                                      q/k are de-interleaved for HF; RotaryEmbedding (other names)
                                      rotates (i, i + D/2) like HF: copied as they are.
    rope_scaling  llama3 | none        LLaMARotaryEmbedding._apply_scaling_factor when rope_use_scale.
    normalize     true | false         tied embeddings only (logits_via_embedding): decoders.py divides
                                      the logits by sqrt(emb) when normalize_embedding_logits (default
                                      true in configs/base.yml).

A flag set to `auto` makes every value of that option a candidate; the converter scores each
candidate by the next-token loss of the converted model on a probe text (converters/probe.py) and
keeps the clear winner (`choose`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from converters import ConvertError

CHOICES = {
    "query_scale": ("fold", "none"),
    "rope_layout": ("interleaved", "half"),
    "rope_scaling": ("llama3", "none"),
    "normalize": ("true", "false"),
}
FLAGS = {"query_scale": "--query-scale", "rope_layout": "--rope-layout", "rope_scaling": "--rope-scaling",
         "normalize": "--normalize-embedding-logits"}
DEFAULT_MARGIN = 0.1  # nats: a winner must beat every other candidate by this much
MAX_LOSS_FRACTION = 0.75  # of ln(vocab): a model whose best loss is above it does not predict the text


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
    """fire/argparse give bools or strings: 'true' | 'false' | 'auto' | None."""
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


def choose(losses: dict[Convention, float], vocab: int, tied: bool, margin: float = DEFAULT_MARGIN,
           max_loss_value: float | None = None) -> Convention:
    """The clear winner, or a one-line ConvertError saying why there is none."""
    ranked = sorted(losses.items(), key=lambda kv: kv[1])
    (best, lb) = ranked[0]
    limit = max_loss(vocab) if max_loss_value is None else max_loss_value
    if not math.isfinite(lb) or lb >= limit:
        raise ConvertError(f"auto: no candidate predicts the probe text (best loss "
                           f"{lb:.3f} nats/token >= {limit:.3f}, uniform would be {math.log(vocab):.3f}): untrained "
                           "weights, a wrong tokenizer or not a Llama; pass the conventions explicitly only if you "
                           "know them")
    if len(ranked) > 1:
        second, ls = ranked[1]
        if ls - lb < margin:
            differ = [FLAGS[f] for f in CHOICES if getattr(best, f) != getattr(second, f)]
            raise ConvertError(f"auto: no clear winner: {best.label(tied)} has loss {lb:.3f} and {second.label(tied)} "
                               f"{ls:.3f} nats/token (less than the {margin} margin apart): the probe cannot tell "
                               f"{' / '.join(differ)} apart on this checkpoint; pass {' and '.join(differ)} explicitly")
    return best
