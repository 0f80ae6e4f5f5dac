"""BlackMamba in Hugging Face transformers (``pip install 'blackmamba-toolkit[hf]'``).

After ``import blackmamba.hf``, ``AutoConfig``, ``AutoModelForCausalLM`` and ``AutoTokenizer`` load a BlackMamba
folder in any of its layouts: the released one (``pytorch_model.bin`` + 12-field ``config.json``), ours
(``model.safetensors`` + our ``config.json``), and the folders ``save_pretrained`` writes. Those carry
``model_type = "blackmamba"`` and an ``auto_map`` with this package's configuration and modeling files, so
they also load with ``trust_remote_code=True`` where ``blackmamba.hf`` is not imported (``blackmamba`` itself
must be installed). See :mod:`.modeling_blackmamba` for what the wrapper does and where it departs from a
transformers model, :func:`.export.export` to write a transformers folder (with tokenizer and model card)
from any checkpoint.

Registration (:mod:`.auto`) happens on import.
"""

from __future__ import annotations

from blackmamba.errors import BlackMambaError


class HFMissingError(BlackMambaError, ImportError):
    """transformers (or a version of it that this bridge supports) is not installed."""


try:
    import transformers
except ImportError:
    raise HFMissingError("blackmamba.hf needs transformers: pip install 'blackmamba-toolkit[hf]'") from None
if int(transformers.__version__.split(".")[0]) < 5:
    raise HFMissingError(
        f"blackmamba.hf needs transformers 5 (its Cache API), found {transformers.__version__}: "
        "pip install 'blackmamba-toolkit[hf]'"
    )

from .auto import register  # noqa: E402
from .cache_blackmamba import BlackMambaCache  # noqa: E402
from .configuration_blackmamba import BlackMambaHFConfig  # noqa: E402
from .export import export  # noqa: E402
from .modeling_blackmamba import BlackMambaCausalLMOutput, BlackMambaForCausalLM, HFError  # noqa: E402
from .tokenization import BlackMambaTokenizer  # noqa: E402

register()

__all__ = [
    "BlackMambaCache",
    "BlackMambaCausalLMOutput",
    "BlackMambaForCausalLM",
    "BlackMambaHFConfig",
    "BlackMambaTokenizer",
    "HFError",
    "HFMissingError",
    "export",
    "register",
]
