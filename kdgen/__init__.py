"""kdgen."""


def __getattr__(name):  # lazy: `import kdgen` stays light; vLLM loads only when used
    if name == "generate":
        from kdgen.api import generate

        return generate
    if name == "score_texts":
        from kdgen.score import score_texts

        return score_texts
    raise AttributeError(f"module 'kdgen' has no attribute {name!r}")
