"""Beam search over HTTP: vLLM's `use_beam_search` extra on /v1/completions and /v1/chat/completions.

`n` is the beam width and the number of choices (best first); `length_penalty` and `ignore_eos` are read,
`temperature` ranks by the tempered distribution (engine/beam_search.py). Fields that only shape sampling are
refused with a 400 naming them rather than silently ignored, as are a stream (the beams are known only at the
end) and a thinking budget (it needs per-sample control of the reasoning span).
"""

from __future__ import annotations

from nemotron3.engine.beam_search import BeamSearchParams
from nemotron3.serve.protocol import APIError

# (field, test for a value beam search cannot honour)
_REFUSED = (
    ("stream", bool),
    ("stop", bool),
    ("stop_token_ids", bool),
    ("min_tokens", bool),
    ("prompt_logprobs", lambda v: v is not None),
    ("logit_bias", bool),
    ("allowed_token_ids", lambda v: v is not None),
    ("bad_words", bool),
    ("top_p", lambda v: v not in (None, 1.0)),
    ("top_k", lambda v: v not in (None, 0, -1)),
    ("min_p", lambda v: v not in (None, 0.0)),
    ("presence_penalty", lambda v: v not in (None, 0.0)),
    ("frequency_penalty", lambda v: v not in (None, 0.0)),
    ("repetition_penalty", lambda v: v not in (None, 1.0)),
)


def beam_search_params(req, max_tokens: int, constrained: bool) -> BeamSearchParams:
    """The request's BeamSearchParams (req.n beams of up to max_tokens tokens). constrained: the request asks for
    structured outputs (refused: beam search ranks the model's own distribution)."""
    for name, refused in _REFUSED:
        if refused(getattr(req, name)):
            raise APIError(400, f"{name} is not supported with use_beam_search", param=name)
    if constrained:
        raise APIError(400, "structured outputs are not supported with use_beam_search", param="use_beam_search")
    try:
        return BeamSearchParams(
            beam_width=req.n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
            temperature=req.temperature or 0.0, length_penalty=req.length_penalty,
        )  # fmt: skip
    except ValueError as e:
        raise APIError(400, str(e).replace("BeamSearchParams.", ""), param="length_penalty") from None
