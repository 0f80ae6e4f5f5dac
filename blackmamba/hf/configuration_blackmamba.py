"""The transformers configuration of a BlackMamba model: :class:`blackmamba.BlackMambaConfig` as a
``PreTrainedConfig`` with ``model_type = "blackmamba"``.

Its fields are those of :class:`~blackmamba.config.BlackMambaConfig`, under the same names, plus what
transformers' generation reads (``bos/eos/pad_token_id``, ``use_cache``). Every value is checked by building the
native config, so a bad field fails with the same :class:`~blackmamba.config.ConfigError` as everywhere else.
:meth:`BlackMambaHFConfig.from_dict` also reads the two native ``config.json`` layouts, the released
12-field one and ours, which carry no ``model_type``.

This file is copied into every folder that ``save_pretrained`` writes (for ``trust_remote_code=True``), so it
imports nothing from ``blackmamba.hf``; it needs the ``blackmamba`` package itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig

from blackmamba.config import BlackMambaConfig, ConfigError
from blackmamba.tokenizer import NEOX_EOS

NATIVE_FIELDS = tuple(f.name for f in dataclasses.fields(BlackMambaConfig))


def native_dict(data: dict[str, Any]) -> dict[str, Any]:
    """The fields of a ``config.json`` dict in either native layout (released or ours), checked; any other
    dict (one with a ``model_type``) unchanged."""
    if not isinstance(data, dict) or "model_type" in data:
        return data
    if "mamba_moe_layers" in data:
        return BlackMambaConfig.from_released(data).to_dict()
    return BlackMambaConfig.from_dict(data).to_dict()


class BlackMambaHFConfig(PreTrainedConfig):
    """The fields of :class:`blackmamba.BlackMambaConfig` (see there for their meaning) for transformers.

    The model fields are taken from the native dataclass, whatever it holds, so the two never drift apart; a
    field left out gets the native default. ``hidden_size``, ``num_hidden_layers`` and
    ``max_position_embeddings`` are aliases of ``d_model``, the number of blocks and ``max_seq_len``, the names
    other libraries (lm-eval, PEFT) look up. Token 0 (``<|endoftext|>`` in GPT-NeoX-20B and in the BPEs this
    package trains) is BOS, EOS and padding by default.
    """

    model_type = "blackmamba"
    attribute_map = {"hidden_size": "d_model", "max_position_embeddings": "max_seq_len"}

    def __init__(
        self,
        bos_token_id: int | None = NEOX_EOS,
        eos_token_id: int | list[int] | None = NEOX_EOS,
        pad_token_id: int | None = NEOX_EOS,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        native = BlackMambaConfig.from_dict({name: kwargs.pop(name) for name in NATIVE_FIELDS if name in kwargs})
        for name, value in native.to_dict().items():
            setattr(self, name, value)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        super().__init__(**kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PreTrainedConfig) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  (mutable, like every config)

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_pattern)

    def to_native(self) -> BlackMambaConfig:
        """The :class:`~blackmamba.BlackMambaConfig` these fields describe (checked)."""
        return BlackMambaConfig(**{name: getattr(self, name) for name in NATIVE_FIELDS})

    @classmethod
    def from_native(cls, config: BlackMambaConfig, **kwargs: Any) -> BlackMambaHFConfig:
        """This configuration for a native one; ``kwargs`` set the transformers fields (``eos_token_id``, ...)."""
        return cls(**config.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """Also reads the native ``config.json`` layouts (released and ours), which have no ``model_type``."""
        return super().from_dict(native_dict(config_dict), **kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        """transformers writes only the fields that differ from the defaults; every model field is written here
        so that a ``config.json`` never depends on the defaults of the version that reads it."""
        out = super().to_diff_dict()
        out.update({name: getattr(self, name) for name in NATIVE_FIELDS})
        return out


__all__ = ["BlackMambaHFConfig", "ConfigError", "native_dict"]
