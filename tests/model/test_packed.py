"""Packed documents (doc_ids): the model over a packed row equals the model over each document alone.

fp32 throughout; tolerance 1e-5 absolute on logits of O(1) magnitude: the packed and separate runs do the
same arithmetic in a different grouping (chunk boundaries move), so they differ by float32 rounding only.
"""

from __future__ import annotations

import pytest
import torch

from nemotron3.config import preset
from nemotron3.model.mamba2 import causal_conv1d, segmented_conv1d, segments_of, ssd_chunk_scan
from nemotron3.model.nemotron import NemotronHForCausalLM


def _model(seed: int = 0) -> NemotronHForCausalLM:
    model = NemotronHForCausalLM(preset("tiny"))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model.eval()


def _doc_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


@pytest.mark.parametrize("lengths", [[5, 37, 1, 20], [300, 9], [1, 1, 1], [64]])
def test_packed_logits_equal_separate_documents(lengths: list[int]) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(sum(lengths))
    ids = torch.randint(0, model.config.vocab_size, (1, sum(lengths)), generator=gen)
    with torch.no_grad():
        packed = model(ids, doc_ids=_doc_ids(lengths)).logits
        alone = torch.cat([model(part).logits for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_no_gradient_flows_between_documents() -> None:
    """The loss of document 2 has no gradient with respect to document 1's embeddings, up to rounding.

    Attention and conv masks cut the path exactly; the scan's decays are differences of one cumulative
    sum over the chunk (exp(s_l − s_j)), whose backward sends +g and −g into earlier steps that cancel
    only to float32 rounding (as in mamba_ssm's seq_idx kernels). So the leak is bounded relative to
    the in-document gradient: 1e-5 is ~100× float32 epsilon, far below any learnable signal.
    """
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    doc = torch.tensor([[0] * 17 + [1] * 23, [4] * 40])
    embeds = model.backbone.embeddings(ids).detach().requires_grad_(True)
    captured = {}

    def swap(_module, _inputs, _output):  # feed our leaf tensor in place of the embedding output
        captured["x"] = embeds
        return embeds

    handle = model.backbone.embeddings.register_forward_hook(swap)
    logits = model(ids, doc_ids=doc).logits
    handle.remove()
    logits[0, 17:].sum().backward()
    grad = captured["x"].grad
    inside = grad[0, 17:].abs().max()
    assert inside > 0
    assert grad[0, :17].abs().max() <= 1e-5 * inside
    assert grad[1].abs().max() == 0


def test_segmented_conv_matches_per_document_conv() -> None:
    gen = torch.Generator().manual_seed(5)
    x, w, bias = torch.randn(2, 30, 6, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    lengths = [[3, 1, 26], [30]]
    seg = torch.stack([segments_of(_doc_ids(ls))[0] for ls in lengths])
    out = segmented_conv1d(x, w, bias, seg)
    for row, ls in enumerate(lengths):
        ref = torch.cat([causal_conv1d(part, w, bias)[0] for part in x[row : row + 1].split(ls, dim=1)], dim=1)
        torch.testing.assert_close(out[row : row + 1], ref, atol=1e-6, rtol=0)


def test_segmented_scan_with_stepping_matches_documents() -> None:
    """Segments that straddle both chunk and `max_chunks` stretch boundaries reset the state exactly."""
    gen = torch.Generator().manual_seed(7)
    b, t, h, p, g, n = 1, 70, 4, 3, 2, 5
    x, B, C = (
        torch.randn(b, t, h, p, generator=gen),
        torch.randn(b, t, g, n, generator=gen),
        torch.randn(b, t, g, n, generator=gen),
    )
    dt = torch.rand(b, t, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) - 0.1
    lengths = [13, 40, 17]
    y, state = ssd_chunk_scan(x, dt, A, B, C, chunk_size=8, max_chunks=2, segments=segments_of(_doc_ids(lengths)))
    start, ys = 0, []
    for n_tok in lengths:
        sl = slice(start, start + n_tok)
        y_doc, s_doc = ssd_chunk_scan(x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], chunk_size=8)
        ys.append(y_doc)
        start += n_tok
    torch.testing.assert_close(y, torch.cat(ys, dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s_doc, atol=1e-5, rtol=1e-5)


def test_doc_ids_refused_with_cache_or_wrong_shape() -> None:
    model = _model()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(ids, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cache"):
        model(ids, cache=model.new_cache(1), doc_ids=torch.zeros(1, 4, dtype=torch.long))
