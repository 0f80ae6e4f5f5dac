"""Registration with transformers' Auto classes (run by ``import blackmamba.hf``).

``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` learn ``model_type = "blackmamba"``, and the
configuration and model classes are marked for ``auto_map``, so that ``save_pretrained`` copies their files
into the folder it writes (for ``trust_remote_code=True`` elsewhere).

The native ``config.json`` layouts (released and ours) have no ``model_type``, and transformers 5 finds a
configuration class only through that key. So ``AutoConfig.from_pretrained`` is wrapped: a local folder whose
``config.json`` is a native BlackMamba config (no ``model_type``; ``mamba_moe_layers`` or ``layer_pattern``)
gets :class:`BlackMambaHFConfig`; everything else goes to transformers unchanged. This is the one change made
to a transformers class; ``AutoModelForCausalLM`` and ``AutoTokenizer`` read the config through it.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .configuration_blackmamba import BlackMambaHFConfig
from .modeling_blackmamba import BlackMambaForCausalLM, native_checkpoint_dir
from .tokenization import BlackMambaTokenizer

# AutoConfig.from_pretrained's own options, which the configuration class does not take.
_AUTO_ONLY_ARGS = ("trust_remote_code", "code_revision")


def _wrap_auto_config() -> None:
    original = AutoConfig.__dict__["from_pretrained"].__func__
    if getattr(original, "_reads_native_blackmamba", False):
        return

    def from_pretrained(cls: type, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        if native_checkpoint_dir(pretrained_model_name_or_path) is not None:
            for name in _AUTO_ONLY_ARGS:
                kwargs.pop(name, None)
            return BlackMambaHFConfig.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return original(cls, pretrained_model_name_or_path, *args, **kwargs)

    from_pretrained._reads_native_blackmamba = True  # type: ignore[attr-defined]
    from_pretrained.__doc__ = original.__doc__
    from_pretrained.__wrapped__ = original  # type: ignore[attr-defined]
    AutoConfig.from_pretrained = classmethod(from_pretrained)  # type: ignore[method-assign]


def register() -> None:
    """Register BlackMamba with the Auto classes (idempotent)."""
    AutoConfig.register(BlackMambaHFConfig.model_type, BlackMambaHFConfig, exist_ok=True)
    AutoModelForCausalLM.register(BlackMambaHFConfig, BlackMambaForCausalLM, exist_ok=True)
    AutoTokenizer.register(BlackMambaHFConfig, tokenizer_class=BlackMambaTokenizer, exist_ok=True)
    BlackMambaHFConfig.register_for_auto_class("AutoConfig")
    BlackMambaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    _wrap_auto_config()


__all__ = ["register"]
