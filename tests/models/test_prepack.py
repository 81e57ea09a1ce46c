"""Pre-packed CPU weights: held once, not twice, and the same logits."""

from __future__ import annotations

import pytest
import torch

from auto_glm.layers.linear import Linear
from auto_glm.loader import load_model
from tests.reference import prefill_logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_prepack_drops_plain_weights_and_keeps_logits(make_checkpoint, tied):
    path = make_checkpoint("LlamaForCausalLM", seed=4, tie_word_embeddings=tied)
    model = load_model(str(path), device="cpu", dtype="float32").model
    ids = torch.randint(0, model.spec.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    before = prefill_logits(model, ids)
    linears = [m for m in model.modules() if isinstance(m, Linear)]

    assert model.prepack(8) == len(linears)
    assert model.prepack(8) == len(linears)  # a second engine on the same model: no-op
    for m in linears:
        kept = tied and m is model.lm_head
        assert (m.weight.numel() > 0) is kept
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(prefill_logits(model, ids), before, atol=1e-5, rtol=1e-5)
