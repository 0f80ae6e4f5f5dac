"""The paper's four models as layer patterns over one config, matched in active parameters per token.

BlackMamba (arXiv 2402.01771, section 5) sets itself against dense Mamba, a transformer and a transformer-MoE.
Here each is the same :class:`~blackmamba.BlackMamba` with other block kinds in its layer pattern:

    kind             sequence mixer   channel mixer
    blackmamba       mamba            moe (top-1)
    mamba            mamba            mlp (dense)
    transformer      attention        mlp
    transformer-moe  attention        moe

Matching (:func:`matched_config`), with "active parameters" the parameters one token passes through, one
expert per MoE block with its router, embedding excluded (the P of :mod:`blackmamba.training.flops`):

1. the pattern: every sequence-mixer position of the base config takes the kind's sequence mixer and every
   channel-mixer position its channel mixer; d_model, the vocabulary, the number of blocks and the Mamba and
   expert counts stay as they are;
2. the attention width W = n_heads * head_dim replaces a Mamba mixer's parameters with as many attention
   parameters as whole heads allow: an attention block has 4 D W (W_qkv 3 D W, W_out W D), so n_heads is
   the whole number nearest (parameters of one Mamba mixer) / (4 D head_dim);
3. the hidden width d_ff of the channel mixers (the dense MLPs, or the experts of the transformer-MoE)
   absorbs what is left: active parameters are affine in d_ff, solved exactly and rounded to the nearest
   whole width, so the four differ by at most half a width step (3 D parameters per channel-mixer block).

Matching active parameters does not match FLOPs: attention costs grow with the context, the Mamba scan has
its own term, and the MoE models carry E times the expert parameters in memory. The experiment
(:mod:`.paper`) therefore gives each model the same training-FLOP budget, counted per kind.
"""

from __future__ import annotations

from ..config import BlackMambaConfig, parameter_count

# kind -> (sequence mixer, channel mixer)
KINDS: dict[str, tuple[str, str]] = {
    "blackmamba": ("mamba", "moe"),
    "mamba": ("mamba", "mlp"),
    "transformer": ("attention", "mlp"),
    "transformer-moe": ("attention", "moe"),
}
LABELS = {
    "blackmamba": "BlackMamba",
    "mamba": "dense Mamba",
    "transformer": "transformer",
    "transformer-moe": "transformer-MoE",
}
SEQUENCE_MIXERS = ("mamba", "attention")
# Without an MoE block in the base config, a model that needs one gets this many experts.
DEFAULT_EXPERTS = 8
DEFAULT_HEAD_DIM = 64


def active_parameters(config: BlackMambaConfig) -> int:
    """Parameters one token passes through (one expert per MoE block, routers included), embedding excluded;
    from the shapes alone (equal to ``BlackMamba(config).num_parameters(active=True, embedding=False)``)."""
    idle_experts = (config.n_experts - 1) * 3 * config.d_model * config.d_ff * config.layer_pattern.count("moe")
    return parameter_count(config) - idle_experts - config.vocab_size * config.d_model


def kind_of(config: BlackMambaConfig) -> str | None:
    """The kind whose two block kinds make up ``config.layer_pattern`` (None for any other pattern)."""
    used = set(config.layer_pattern)
    return next((kind for kind, pair in KINDS.items() if used == set(pair)), None)


def _mamba_mixer_parameters(config: BlackMambaConfig) -> int:
    """Parameters of one Mamba mixer of ``config``'s sizes (its block without the norm)."""
    one = BlackMambaConfig.from_dict({**config.to_dict(), "layer_pattern": ["mamba"]})
    return parameter_count(one) - config.vocab_size * config.d_model - 2 * config.d_model - config.d_model


def matched_config(base: BlackMambaConfig, kind: str, head_dim: int | None = None) -> BlackMambaConfig:
    """``base`` turned into a model of ``kind`` with the same active parameters (see the module docstring).

    ``head_dim`` applies when attention replaces Mamba (default 64); a base that already has attention keeps
    its heads. The kind of ``base`` itself gives ``base`` back unchanged."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {list(KINDS)}")
    mixer, channel = KINDS[kind]
    fields = base.to_dict()
    fields["layer_pattern"] = [mixer if k in SEQUENCE_MIXERS else channel for k in base.layer_pattern]
    if mixer == "attention" and "attention" not in base.layer_pattern:
        fields["head_dim"] = head_dim or DEFAULT_HEAD_DIM
        heads = _mamba_mixer_parameters(base) / (4 * base.d_model * fields["head_dim"])
        fields["n_heads"] = max(1, round(heads))
    if channel == "moe" and fields["n_experts"] < 1:
        fields["n_experts"] = DEFAULT_EXPERTS
    if channel not in fields["layer_pattern"]:
        return BlackMambaConfig.from_dict(fields)
    target = active_parameters(base)
    at_1 = active_parameters(BlackMambaConfig.from_dict({**fields, "d_ff": 1}))
    slope = active_parameters(BlackMambaConfig.from_dict({**fields, "d_ff": 2})) - at_1
    fields["d_ff"] = max(1, round(1 + (target - at_1) / slope))
    return BlackMambaConfig.from_dict(fields)


def matched_configs(base: BlackMambaConfig, head_dim: int | None = None) -> dict[str, BlackMambaConfig]:
    """All four kinds matched to ``base`` (see :func:`matched_config`), in the order of :data:`KINDS`."""
    return {kind: matched_config(base, kind, head_dim) for kind in KINDS}
