"""Released-layout checkpoints give the logits of an independent forward written from the spec.

``reference_forward`` below is written from ../shared/spec/blackmamba-reference.md sections 1-3 alone and
works directly on the released state dict (released key names, one weight pair per expert, sequential
scan, loop over experts, fp32), the way the released inference code computes.
"""

import json
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from blackmamba import load_pretrained

from ..helpers import assert_close


def reference_forward(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    d = cfg["hidden_size"]
    d_in = cfg["expansion_factor"] * d
    n = cfg["state_size"]
    r = math.ceil(d / 16)
    sd = {k: v.float() for k, v in sd.items()}
    emb = sd["embedding.word_embeddings.weight"]
    hidden = emb[ids]
    residual = None
    for i, code in enumerate(cfg["mamba_moe_layers"]):
        p = f"decoder.layers.{i}."
        residual = hidden if residual is None else hidden + residual
        w = sd[p + "norm.weight"]
        u = residual / torch.sqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        if code == "r":
            hidden = mamba_reference(sd, p + "mixer.", u, d_in, n, r, cfg["conv_dimension"])
        else:
            hidden = moe_reference(sd, p + "mixer.", u, int(code[-1]), cfg["ffn_hidden_size"])
    residual = hidden + residual
    x = F.layer_norm(residual, (d,), sd["decoder.final_layernorm.weight"], sd["decoder.final_layernorm.bias"], 1e-5)
    return x @ emb.t()


def mamba_reference(sd, p, u, d_in, n, r, k):
    batch, length, _ = u.shape
    xz = u @ sd[p + "in_proj.weight"].t()
    x, z = xz[..., :d_in], xz[..., d_in:]
    conv = F.conv1d(x.transpose(1, 2), sd[p + "conv1d.weight"], sd[p + "conv1d.bias"], padding=k - 1, groups=d_in)
    x = F.silu(conv[..., :length]).transpose(1, 2)
    x_dbl = x @ sd[p + "x_proj.weight"].t()
    dt_low, Bm, Cm = x_dbl[..., :r], x_dbl[..., r : r + n], x_dbl[..., r + n :]
    dt = F.softplus(dt_low @ sd[p + "dt_proj.weight"].t() + sd[p + "dt_proj.bias"])
    A = -torch.exp(sd[p + "A_log"])
    h = torch.zeros(batch, d_in, n)
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * Bm[:, t, None, :] * x[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + sd[p + "D"] * x[:, t])
    y = torch.stack(ys, 1) * F.silu(z)
    return y @ sd[p + "out_proj.weight"].t()


def moe_reference(sd, p, u, experts, ffn):
    flat = u.reshape(-1, u.shape[-1])
    probs = torch.sigmoid(flat @ sd[p + "router.weight"].t() + sd[p + "router.bias"])
    gate, idx = probs.max(dim=-1)
    out = torch.zeros_like(flat)
    for e in range(experts):
        sel = idx == e
        h = flat[sel] @ sd[p + f"local_experts.{e}.linear_fc1.weight"].t()
        h = F.gelu(h[:, :ffn]) * h[:, ffn:]
        out[sel] = h @ sd[p + f"local_experts.{e}.linear_fc2.weight"].t()
    return (out * gate[:, None]).view_as(u)


def synthetic_released(path, hidden, layers, ffn, vocab, experts=8, state=16, seed=0, dtype=torch.bfloat16):
    """A released-layout checkpoint built from the spec's key table (section 3.3) with random weights."""
    g = torch.Generator().manual_seed(seed)
    d_in, r = 2 * hidden, math.ceil(hidden / 16)

    def rnd(*shape, scale=0.2, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    sd = OrderedDict()
    sd["embedding.word_embeddings.weight"] = rnd(vocab, hidden, scale=1.0)
    for i, code in enumerate(layers):
        p = f"decoder.layers.{i}."
        sd[p + "norm.weight"] = rnd(hidden, shift=1.0)
        if code == "r":
            sd[p + "mixer.in_proj.weight"] = rnd(2 * d_in, hidden)
            sd[p + "mixer.conv1d.weight"] = rnd(d_in, 1, 4, scale=0.5)
            sd[p + "mixer.conv1d.bias"] = rnd(d_in)
            sd[p + "mixer.x_proj.weight"] = rnd(r + 2 * state, d_in)
            sd[p + "mixer.dt_proj.weight"] = rnd(d_in, r)
            sd[p + "mixer.dt_proj.bias"] = rnd(d_in, scale=1.0, shift=-3.0)
            sd[p + "mixer.A_log"] = (torch.rand(d_in, state, generator=g) * 3).to(dtype)
            sd[p + "mixer.D"] = rnd(d_in, scale=1.0)
            sd[p + "mixer.out_proj.weight"] = rnd(hidden, d_in)
        else:
            sd[p + "mixer.router.weight"] = rnd(experts, hidden, scale=1.0)
            sd[p + "mixer.router.bias"] = rnd(experts)
            for e in range(experts):
                sd[p + f"mixer.local_experts.{e}.linear_fc1.weight"] = rnd(2 * ffn, hidden)
                sd[p + f"mixer.local_experts.{e}.linear_fc2.weight"] = rnd(hidden, ffn)
    sd["decoder.final_layernorm.weight"] = rnd(hidden, shift=1.0)
    sd["decoder.final_layernorm.bias"] = rnd(hidden)
    cfg = {
        "num_layers": len(layers),
        "hidden_size": hidden,
        "state_size": state,
        "conv_dimension": 4,
        "vocab_size": vocab,
        "expansion_factor": 2,
        "mamba_moe_layers": list(layers),
        "ffn_hidden_size": ffn,
        "bias": False,
        "add_bias_linear": False,
        "swiglu": True,
        "max_sequence_length": 2048,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    torch.save({"model": sd}, path / "pytorch_model.bin")
    return sd, cfg


CASES = [
    # hidden, layer pattern, ffn, vocab, experts
    (64, ["r", "8", "r", "8"], 128, 512, 8),
    (48, ["r", "8", "r", "8", "r", "8"], 80, 300, 8),
    (40, ["r", "r", "4", "r", "4"], 72, 256, 4),
    (32, ["r", "r"], 64, 128, 8),
]


@pytest.mark.parametrize("hidden,layers,ffn,vocab,experts", CASES)
def test_released_checkpoint_matches_reference_logits(tmp_path, hidden, layers, ffn, vocab, experts):
    sd, cfg = synthetic_released(tmp_path, hidden, layers, ffn, vocab, experts, seed=hidden)
    model = load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits
    ref = reference_forward(sd, cfg, ids)
    assert ours.shape == (2, 37, vocab)
    assert_close("logits", ref, ours, "fp32_model")
    # The experts really are exercised: more than one expert is chosen somewhere.
    assert ref.std() > 0


def test_released_checkpoint_routing_uses_several_experts(tmp_path):
    sd, cfg = synthetic_released(tmp_path, 64, ["r", "8"], 96, 128)
    model = load_pretrained(tmp_path, dtype=torch.float32)
    x = torch.randn(200, 64)
    expert, gate = model.layers[1].mixer.route(x)
    assert len(set(expert.tolist())) > 3
    assert torch.all((gate > 0) & (gate <= 1))
