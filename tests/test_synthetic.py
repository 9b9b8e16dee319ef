"""The synthetic benchmark model of DESIGN.md: every weight matrix but the router quantized."""

import mlx.nn as nn

from moedec.synthetic import synthetic_glm


def test_every_matrix_but_the_router_is_quantized():
    model = synthetic_glm(scale=0.0625, num_hidden_layers=2)
    plain = [p for p, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Embedding)) and not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    assert plain == []  # the LM head and the embedding included (they were left bf16 before)
    assert all(not hasattr(l.mlp, "gate") or "scales" not in l.mlp.gate for l in model.model.layers)
