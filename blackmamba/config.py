"""The model configuration: one flat dataclass that is also the JSON schema of ``config.json``.

Shape vocabulary used across the package (paper symbols in brackets):

    B batch, L sequence length, T tokens (B*L flattened), D d_model, D_in d_inner = expand*D [E*D in Mamba],
    N d_state [N], K d_conv, R dt_rank, E n_experts, F d_ff (expert hidden width), V vocab_size,
    H n_heads and Dh head_dim of the attention baselines (W = H*Dh the attention width), C the KV cache's
    capacity (max_seq_len).

The released checkpoints use a different ``config.json`` (12 Megatron-style fields, spec section 2.1);
:meth:`BlackMambaConfig.from_released` reads it and :meth:`BlackMambaConfig.to_released` writes it back.

Every ``config.json`` is untrusted input. Both layouts are checked field by field (types, then the bounds in
:data:`LIMITS`, then the total parameter count against :data:`MAX_PARAMETERS`) before anything is built, so a
hostile file (a million layers, a string where a number belongs, JSON nested a million deep) fails at once
with a :class:`ConfigError` naming the field, instead of allocating for hours or raising deep inside torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import BlackMambaError

# The block kinds: the two of BlackMamba, and the attention and dense MLP of the paper's baselines (dense Mamba =
# mamba + mlp, transformer = attention + mlp, transformer-MoE = attention + moe).
LAYER_KINDS = ("mamba", "moe", "attention", "mlp")
ACTIVATIONS = ("gelu", "silu", "gelu_tanh")
# Weight formats other than plain floating point (``quantization``; None = none): fp8 e4m3 weight-only.
QUANTIZATIONS = ("fp8",)

# Upper bounds of the size fields (the lower bound is 1). Each is far above any model of this family (the
# 2.8B has d_model 1472, 36 blocks, 8 experts, d_ff 3872 and a 50,304-token vocabulary) and of any published
# Mamba or MoE model, yet small enough that no single bound lets a config.json ask for an absurd allocation.
# ``n_layers`` bounds the length of ``layer_pattern`` (``num_layers`` in the released layout).
LIMITS: dict[str, int] = {
    "vocab_size": 2**24,
    "d_model": 65536,
    "n_layers": 1024,
    "d_state": 1024,
    "d_conv": 256,
    "expand": 64,
    "dt_rank": 65536,
    "n_experts": 1024,
    "d_ff": 2**20,
    "max_seq_len": 2**24,
    "sinkhorn_max_iters": 100_000,
    "n_heads": 65536,
    "head_dim": 65536,
}
# The sizes above can still multiply into an impossible model; the total parameter count (embedding and every
# expert included) is bounded too: 2**41, about 2.2 trillion, is above any released language model.
MAX_PARAMETERS = 2**41
# A config.json is a few kilobytes; a larger file is not one and is not read into memory.
MAX_CONFIG_BYTES = 16 * 2**20


class ConfigError(BlackMambaError, ValueError):
    """A configuration value is invalid; the message names the field."""


def _show(value: Any) -> str:
    """``repr(value)`` cut short: a hostile field may hold a megabyte of text."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    # bool is an int subclass; ``true`` where a size belongs is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"config field '{name}' must be an integer from {low} to {high:,}, got {_show(value)}")


def _check_real(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low:g}" + ("" if math.isinf(high) else f" and <= {high:g}")
        raise ConfigError(f"config field '{name}' must be a finite number {bound}, got {_show(value)}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"config field '{name}' must be one of {list(choices)}, got {_show(value)}")


def _check_pattern(pattern: Any) -> None:
    if not isinstance(pattern, list | tuple):
        raise ConfigError(f"config field 'layer_pattern' must be a list of block kinds, got {_show(pattern)}")
    if not 1 <= len(pattern) <= LIMITS["n_layers"]:
        raise ConfigError(
            f"config field 'layer_pattern' must list from 1 to {LIMITS['n_layers']} blocks, got {len(pattern):,}"
        )
    bad = [kind for kind in pattern if not isinstance(kind, str) or kind not in LAYER_KINDS]
    if bad:
        raise ConfigError(
            f"config field 'layer_pattern' has unknown block kinds {_show(bad)}; allowed: {list(LAYER_KINDS)}"
        )


def parameter_count(config: BlackMambaConfig) -> int:
    """Total parameters of the model ``config`` describes (tied head: the embedding counts once), from the
    shapes alone, so that the size bound is checked before anything is built. Equal to
    ``BlackMamba(config).num_parameters()``; a test holds the two together."""
    d, di, n, r, k = config.d_model, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    e, f, w = config.n_experts, config.d_ff, config.n_heads * config.head_dim
    mamba = d + 2 * di * d + di * k + (di if config.conv_bias else 0) + (r + 2 * n) * di + r * di + di
    mamba += di * n + di + d * di
    per_kind = {
        "mamba": mamba,
        "moe": d + e * d + e + e * 2 * f * d + e * d * f,
        "attention": d + 3 * w * d + w * d,
        "mlp": d + 2 * f * d + d * f,
    }
    blocks = sum(per_kind[kind] * config.layer_pattern.count(kind) for kind in LAYER_KINDS)
    return config.vocab_size * d + blocks + 2 * d


@dataclass
class BlackMambaConfig:
    """Everything needed to build a :class:`blackmamba.BlackMamba`.

    ``layer_pattern`` lists the block kinds in order ("mamba" or "moe"); the released models alternate
    them starting with Mamba and ending with MoE. ``moe_activation`` is the expert gate activation:
    the released inference code computes exact (erf) GELU although its config says ``swiglu``
    (spec section 1.4), so "gelu" is the default and "silu" gives SwiGLU.

    The paper's baselines use two more kinds (see :mod:`blackmamba.experiments.baselines`): "attention",
    causal self-attention of ``n_heads`` heads of ``head_dim`` with rotary positions (base ``rope_theta``) and
    a KV cache of ``max_seq_len`` positions in generation, and "mlp", a dense gated MLP of width ``d_ff``
    with the experts' activation (one expert without a router). Released models have neither.

    Routing: in eval mode every model routes like the released code (sigmoid, top-1). In training mode
    ``train_routing`` picks the expert either by Sinkhorn ("sinkhorn", the paper's choice; ``sinkhorn_*``
    set its initialisation, tolerance, iteration cap and stopping test; see
    :mod:`blackmamba.routing.sinkhorn` for why the scale-free "marginals" test can matter) or by plain
    top-1 ("top1"). The optional
    switch-style balancing loss and router z-loss are weighted by ``load_balance_weight`` and
    ``z_loss_weight`` (0 = off, as in the paper).

    ``quantization`` is None for a model in one floating-point dtype, or "fp8" for one whose Mamba projections
    and experts are stored as e4m3 with per-output-channel scales (inference only; see
    :mod:`blackmamba.layers.quant`). It says what a checkpoint holds; ``BlackMamba(config)`` builds the plain
    model, which ``quantize_fp8`` turns into that one.
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
    n_heads: int = 0
    head_dim: int = 64
    rope_theta: float = 10000.0
    quantization: str | None = None

    def __post_init__(self) -> None:
        # The fields that other fields derive from are checked first, so that a wrong type fails here with the
        # field's name rather than in the arithmetic below.
        _check_pattern(self.layer_pattern)
        self.layer_pattern = list(self.layer_pattern)
        _check_int("d_model", self.d_model, 1, LIMITS["d_model"])
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
        """Raise :class:`ConfigError` naming the first field with a wrong type or a value out of bounds."""
        _check_pattern(self.layer_pattern)
        for name in ("vocab_size", "d_model", "d_state", "d_conv", "expand", "dt_rank", "max_seq_len"):
            _check_int(name, getattr(self, name), 1, LIMITS[name])
        # Sizes of a block kind the pattern does not use are unused; 0 is then accepted.
        kinds = set(self.layer_pattern)
        _check_int("n_experts", self.n_experts, 1 if "moe" in kinds else 0, LIMITS["n_experts"])
        _check_int("d_ff", self.d_ff, 1 if kinds & {"moe", "mlp"} else 0, LIMITS["d_ff"])
        _check_int("n_heads", self.n_heads, 1 if "attention" in kinds else 0, LIMITS["n_heads"])
        _check_int("head_dim", self.head_dim, 1 if "attention" in kinds else 0, LIMITS["head_dim"])
        if "attention" in kinds and self.head_dim % 2:
            raise ConfigError(
                f"config field 'head_dim' must be even (rotary positions turn pairs of channels), got {self.head_dim}"
            )
        _check_real("rope_theta", self.rope_theta, 1.0, math.inf, low_open=True)
        _check_choice("moe_activation", self.moe_activation, ACTIVATIONS)
        _check_real("norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)
        if not isinstance(self.conv_bias, bool):
            raise ConfigError(f"config field 'conv_bias' must be true or false, got {_show(self.conv_bias)}")
        if self.tokenizer_vocab_size is not None:
            _check_int("tokenizer_vocab_size", self.tokenizer_vocab_size, 1, LIMITS["vocab_size"])
            if self.tokenizer_vocab_size > self.vocab_size:
                raise ConfigError(
                    f"config field 'tokenizer_vocab_size' ({self.tokenizer_vocab_size}) exceeds "
                    f"'vocab_size' ({self.vocab_size})"
                )
        _check_real("initializer_range", self.initializer_range, 0.0, 10.0)
        _check_real("dt_min", self.dt_min, 0.0, math.inf, low_open=True)
        _check_real("dt_max", self.dt_max, 0.0, math.inf, low_open=True)
        if self.dt_min > self.dt_max:
            raise ConfigError(f"config needs dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        _check_real("dt_init_floor", self.dt_init_floor, 0.0, math.inf)
        _check_choice("train_routing", self.train_routing, ("sinkhorn", "top1"))
        _check_choice("sinkhorn_init", self.sinkhorn_init, ("zyphra", "ones"))
        _check_choice("sinkhorn_criterion", self.sinkhorn_criterion, ("released", "marginals"))
        if self.quantization is not None and (
            not isinstance(self.quantization, str) or self.quantization not in QUANTIZATIONS
        ):
            allowed, got = list(QUANTIZATIONS), _show(self.quantization)
            raise ConfigError(f"config field 'quantization' must be null or one of {allowed}, got {got}")
        _check_int("sinkhorn_max_iters", self.sinkhorn_max_iters, 1, LIMITS["sinkhorn_max_iters"])
        for name in ("sinkhorn_tol", "load_balance_weight", "z_loss_weight"):
            _check_real(name, getattr(self, name), 0.0, math.inf)
        total = parameter_count(self)
        if total > MAX_PARAMETERS:
            raise ConfigError(
                f"config describes a model of {total:,} parameters, above the supported {MAX_PARAMETERS:,} "
                f"(d_model {self.d_model}, {self.n_layers} blocks, {self.n_experts} experts of d_ff {self.d_ff}, "
                f"vocab {self.vocab_size})"
            )

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlackMambaConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {_show(unknown)}; known fields: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> BlackMambaConfig:
        """Read a config from a JSON file (ours or the released layout) or a JSON string.

        Every failure is a :class:`ConfigError`; when the config came from a file its message starts with
        the file's path."""
        text = str(path_or_text)
        if isinstance(path_or_text, os.PathLike) or not text.lstrip().startswith("{"):
            return _with_path(path_or_text, lambda: cls._from_text(_read_config_file(path_or_text)))
        return cls._from_text(text)

    @classmethod
    def _from_text(cls, text: str) -> BlackMambaConfig:
        try:
            data = json.loads(text)
        except RecursionError:
            raise ConfigError("not valid JSON: nested too deeply") from None
        except ValueError as e:  # JSONDecodeError, and ints longer than Python converts
            raise ConfigError(f"not valid JSON: {e}") from None
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
        """Adapt the released 12-field ``config.json`` (spec section 2.1). Fields the model does not use are
        ignored, as the reference code ignores them; the used ones are checked for type and bounds first."""
        if not isinstance(data, dict):
            raise ConfigError(f"a released config must be a JSON object, got {type(data).__name__}")
        required = ("num_layers", "hidden_size", "vocab_size", "ffn_hidden_size")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"released config.json lacks fields {missing}")
        sizes = {  # released name -> (our name, default)
            "num_layers": ("n_layers", None),
            "hidden_size": ("d_model", None),
            "vocab_size": ("vocab_size", None),
            "ffn_hidden_size": ("d_ff", None),
            "state_size": ("d_state", 16),
            "conv_dimension": ("d_conv", 4),
            "expansion_factor": ("expand", 2),
            "max_sequence_length": ("max_seq_len", 2048),
        }
        value: dict[str, int] = {}
        for name, (ours, default) in sizes.items():
            value[name] = data.get(name, default)
            _check_int(name, value[name], 1, LIMITS[ours])
        for name in ("add_bias_linear", "swiglu", "bias"):
            if name in data and not isinstance(data[name], bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {_show(data[name])}")
        if data.get("add_bias_linear", False):
            raise ConfigError("released config with add_bias_linear=true is not supported (the releases use false)")
        if not data.get("swiglu", True):
            raise ConfigError("released config with swiglu=false (ungated experts) is not supported")
        num_layers = value["num_layers"]
        codes = data.get("mamba_moe_layers")
        if codes is None:
            codes = []
        if not isinstance(codes, list):
            raise ConfigError(f"config field 'mamba_moe_layers' must be a list, got {_show(codes)}")
        if codes and len(codes) != num_layers:
            raise ConfigError(f"mamba_moe_layers has {len(codes):,} entries but num_layers is {num_layers}")
        pattern: list[str] = []
        experts: set[int] = set()
        for i, code in enumerate(codes or ["r"] * num_layers):
            if isinstance(code, bool) or not isinstance(code, str | int):
                raise ConfigError(f"mamba_moe_layers[{i}] must be a string such as 'r' or '8', got {_show(code)}")
            code = str(code)
            if code == "r":
                pattern.append("mamba")
            elif code and code[0] not in "r1" and code[-1].isdigit():
                pattern.append("moe")
                # The reference reads the expert count from the last character only.
                experts.add(int(code[-1]))
            else:
                raise ConfigError(
                    f"mamba_moe_layers[{i}] = {_show(code)}: only 'r' (Mamba) and MoE entries like '8' are supported"
                )
        if len(experts) > 1:
            raise ConfigError(f"mamba_moe_layers mixes expert counts {sorted(experts)}; one count is supported")
        vocab = value["vocab_size"]
        return cls(
            vocab_size=vocab,
            d_model=value["hidden_size"],
            layer_pattern=pattern,
            d_state=value["state_size"],
            d_conv=value["conv_dimension"],
            expand=value["expansion_factor"],
            n_experts=experts.pop() if experts else 8,
            d_ff=value["ffn_hidden_size"],
            moe_activation="gelu",
            tokenizer_vocab_size=NEOX_VOCAB_SIZE if vocab >= NEOX_VOCAB_SIZE else None,
            max_seq_len=value["max_sequence_length"],
        )

    def to_released(self) -> dict[str, Any]:
        """The released ``config.json`` for this model (for use with the reference code)."""
        others = sorted(set(self.layer_pattern) - {"mamba", "moe"})
        if others:
            raise ConfigError(
                f"the released layout holds Mamba and MoE blocks only; this model also has {others} blocks "
                "(keep it in our layout)"
            )
        if self.quantization is not None:
            raise ConfigError(
                f"the released layout holds unquantized weights only; this model is {self.quantization} "
                "(keep it in our layout)"
            )
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


def _read_config_file(path: str | os.PathLike) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 2**20} MiB, so not a config file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})") from None


def _with_path(path: str | os.PathLike, read: Any) -> BlackMambaConfig:
    """``read()``, with the file's path put in front of the message of any :class:`ConfigError`."""
    try:
        return read()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


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
