"""The model configuration: one flat dataclass that is also the JSON schema of ``config.json``.

Shape vocabulary used across the package (paper symbols in brackets):

    B batch, L sequence length, T tokens (B*L flattened), D d_model, D_in d_inner = expand*D [E*D in Mamba],
    N d_state [N], K d_conv, R dt_rank, E n_experts, F d_ff (expert hidden width), V vocab_size.

The released checkpoints use a different ``config.json`` (12 Megatron-style fields, spec section 2.1);
:meth:`BlackMambaConfig.from_released` reads it and :meth:`BlackMambaConfig.to_released` writes it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

LAYER_KINDS = ("mamba", "moe")
ACTIVATIONS = ("gelu", "silu", "gelu_tanh")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class BlackMambaConfig:
    """Everything needed to build a :class:`blackmamba.BlackMamba`.

    ``layer_pattern`` lists the block kinds in order ("mamba" or "moe"); the released models alternate
    them starting with Mamba and ending with MoE. ``moe_activation`` is the expert gate activation:
    the released inference code computes exact (erf) GELU although its config says ``swiglu``
    (spec section 1.4), so "gelu" is the default and "silu" gives SwiGLU.

    Routing: in eval mode every model routes like the released code (sigmoid, top-1). In training mode
    ``train_routing`` picks the expert either by Sinkhorn ("sinkhorn", the paper's choice; ``sinkhorn_*``
    set its initialisation, tolerance, iteration cap and stopping test; see
    :mod:`blackmamba.routing.sinkhorn` for why the scale-free "marginals" test can matter) or by plain
    top-1 ("top1"). The optional
    switch-style balancing loss and router z-loss are weighted by ``load_balance_weight`` and
    ``z_loss_weight`` (0 = off, as in the paper).
    """

    vocab_size: int = 50304
    d_model: int = 1472
    layer_pattern: list[str] = field(default_factory=lambda: ["mamba", "moe"] * 18)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    n_experts: int = 8
    d_ff: int = 3872
    moe_activation: str = "gelu"
    norm_eps: float = 1e-5
    conv_bias: bool = True
    tokenizer_vocab_size: int | None = None
    max_seq_len: int = 2048
    initializer_range: float = 0.02
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    train_routing: str = "sinkhorn"
    sinkhorn_init: str = "zyphra"
    sinkhorn_tol: float = 1e-4
    sinkhorn_max_iters: int = 50
    sinkhorn_criterion: str = "released"
    load_balance_weight: float = 0.0
    z_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        self.layer_pattern = list(self.layer_pattern)
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.validate()

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_layers(self) -> int:
        return len(self.layer_pattern)

    def validate(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")

        for name in ("vocab_size", "d_model", "d_state", "d_conv", "expand", "dt_rank", "max_seq_len"):
            positive(name)
        if not self.layer_pattern:
            raise ConfigError("config field 'layer_pattern' must list at least one block")
        bad = [kind for kind in self.layer_pattern if kind not in LAYER_KINDS]
        if bad:
            raise ConfigError(f"config field 'layer_pattern' has unknown block kinds {bad}; allowed: {LAYER_KINDS}")
        if "moe" in self.layer_pattern:
            positive("n_experts")
            positive("d_ff")
        if self.moe_activation not in ACTIVATIONS:
            raise ConfigError(
                f"config field 'moe_activation' must be one of {ACTIVATIONS}, got {self.moe_activation!r}"
            )
        if not (isinstance(self.norm_eps, int | float) and self.norm_eps > 0):
            raise ConfigError(f"config field 'norm_eps' must be a positive number, got {self.norm_eps!r}")
        if self.tokenizer_vocab_size is not None:
            positive("tokenizer_vocab_size")
            if self.tokenizer_vocab_size > self.vocab_size:
                raise ConfigError(
                    f"config field 'tokenizer_vocab_size' ({self.tokenizer_vocab_size}) exceeds "
                    f"'vocab_size' ({self.vocab_size})"
                )
        if self.train_routing not in ("sinkhorn", "top1"):
            raise ConfigError(f"config field 'train_routing' must be 'sinkhorn' or 'top1', got {self.train_routing!r}")
        if self.sinkhorn_init not in ("zyphra", "ones"):
            raise ConfigError(f"config field 'sinkhorn_init' must be 'zyphra' or 'ones', got {self.sinkhorn_init!r}")
        if self.sinkhorn_criterion not in ("released", "marginals"):
            raise ConfigError(
                f"config field 'sinkhorn_criterion' must be 'released' or 'marginals', got {self.sinkhorn_criterion!r}"
            )
        positive("sinkhorn_max_iters")
        for name in ("sinkhorn_tol", "load_balance_weight", "z_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"config field '{name}' must be a number >= 0, got {value!r}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"config needs 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlackMambaConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> BlackMambaConfig:
        """Read a config from a JSON file (ours or the released layout) or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            try:
                with open(path_or_text) as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read config file {path_or_text}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config {path_or_text} is not valid JSON: {e}") from None
        if isinstance(data, dict) and "mamba_moe_layers" in data:
            return cls.from_released(data)
        return cls.from_dict(data)

    # ------------------------------------------------------------ presets

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> BlackMambaConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    # ---------------------------------------------------- released config.json

    @classmethod
    def from_released(cls, data: dict[str, Any]) -> BlackMambaConfig:
        """Adapt the released 12-field ``config.json`` (spec section 2.1)."""
        required = ("num_layers", "hidden_size", "vocab_size", "ffn_hidden_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"released config.json lacks fields {missing}")
        if data.get("add_bias_linear", False):
            raise ConfigError("released config with add_bias_linear=true is not supported (the releases use false)")
        num_layers = data["num_layers"]
        codes = list(data.get("mamba_moe_layers") or [])
        if codes and len(codes) != num_layers:
            raise ConfigError(f"mamba_moe_layers has {len(codes)} entries but num_layers is {num_layers}")
        pattern: list[str] = []
        experts: set[int] = set()
        for i, code in enumerate(codes or ["r"] * num_layers):
            code = str(code)
            if code == "r":
                pattern.append("mamba")
            elif code and code[0] not in "r1" and code[-1].isdigit():
                pattern.append("moe")
                # The reference reads the expert count from the last character only.
                experts.add(int(code[-1]))
            else:
                raise ConfigError(
                    f"mamba_moe_layers[{i}] = {code!r}: only 'r' (Mamba) and MoE entries like '8' are supported"
                )
        if len(experts) > 1:
            raise ConfigError(f"mamba_moe_layers mixes expert counts {sorted(experts)}; one count is supported")
        if "swiglu" in data and not data["swiglu"]:
            raise ConfigError("released config with swiglu=false (ungated experts) is not supported")
        vocab = int(data["vocab_size"])
        return cls(
            vocab_size=vocab,
            d_model=int(data["hidden_size"]),
            layer_pattern=pattern,
            d_state=int(data.get("state_size", 16)),
            d_conv=int(data.get("conv_dimension", 4)),
            expand=int(data.get("expansion_factor", 2)),
            n_experts=experts.pop() if experts else 8,
            d_ff=int(data["ffn_hidden_size"]),
            moe_activation="gelu",
            tokenizer_vocab_size=NEOX_VOCAB_SIZE if vocab >= NEOX_VOCAB_SIZE else None,
            max_seq_len=int(data.get("max_sequence_length", 2048)),
        )

    def to_released(self) -> dict[str, Any]:
        """The released ``config.json`` for this model (for use with the reference code)."""
        if self.moe_activation != "gelu":
            raise ConfigError(
                f"the released layout's reference code always computes GELU experts; this model uses "
                f"{self.moe_activation!r} and would give different logits there"
            )
        if self.dt_rank != math.ceil(self.d_model / 16) or not self.conv_bias:
            raise ConfigError("the released layout needs dt_rank = ceil(d_model/16) and conv_bias = true")
        return {
            "num_layers": self.n_layers,
            "hidden_size": self.d_model,
            "state_size": self.d_state,
            "conv_dimension": self.d_conv,
            "vocab_size": self.vocab_size,
            "expansion_factor": self.expand,
            "mamba_moe_layers": ["r" if k == "mamba" else str(self.n_experts) for k in self.layer_pattern],
            "ffn_hidden_size": self.d_ff,
            "bias": False,
            "add_bias_linear": False,
            "swiglu": True,
            "max_sequence_length": self.max_seq_len,
        }


NEOX_VOCAB_SIZE = 50277

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, d_model=32, layer_pattern=["mamba", "moe"] * 2, d_state=8, n_experts=4, d_ff=48),
    "small": dict(vocab_size=4096, d_model=256, layer_pattern=["mamba", "moe"] * 4, n_experts=8, d_ff=512),
    "blackmamba-1.5b": dict(
        vocab_size=50304,
        d_model=1152,
        layer_pattern=["mamba", "moe"] * 15,
        n_experts=8,
        d_ff=3072,
        tokenizer_vocab_size=NEOX_VOCAB_SIZE,
    ),
    "blackmamba-2.8b": dict(
        vocab_size=50304,
        d_model=1472,
        layer_pattern=["mamba", "moe"] * 18,
        n_experts=8,
        d_ff=3872,
        tokenizer_vocab_size=NEOX_VOCAB_SIZE,
    ),
}
