"""BlackMamba as a transformers causal LM: ``AutoModelForCausalLM``, ``generate``, pipelines, PEFT, lm-eval.

:class:`BlackMambaForCausalLM` wraps a native :class:`blackmamba.BlackMamba`: it registers the native
model's embedding, blocks and final norm as its own children (the same modules and parameters, nothing is
copied), so its state-dict keys are exactly those of our checkpoint layout (``embedding.weight``,
``layers.{i}.mixer.w1``, ...) and the ``model.safetensors`` that ``save_pretrained`` writes holds what
:func:`blackmamba.save_pretrained` would write. Its forward calls the native forward (prefill, training)
or the native decode step (one token per row from a :class:`~.cache_blackmamba.BlackMambaCache`), so the
native kernels run under transformers: the Triton kernels on a GPU, the reference ops on a CPU. The CUDA
graphs of :func:`blackmamba.generate` are not used: transformers' loop calls the model once per token with
tensors of its own.

Where it departs from a transformers model:

* the head is the embedding (tied): there is no ``lm_head`` parameter, ``get_output_embeddings`` is None;
* ``inputs_embeds`` and ``output_hidden_states`` are refused (the native model takes token ids);
* padding must be on the left when a cache is kept (generation); a right-padded batch without a cache
  (training, scoring) is fine, since no real position sees a later one;
* ``from_pretrained`` also reads the native layouts (released ``pytorch_model.bin`` + 12-field
  ``config.json``, or ours), through :func:`blackmamba.load_pretrained` and its checks;
* A_log, D and the dt bias stay fp32 whatever dtype the model is loaded in, as in the native model;
* ids at and above ``tokenizer_vocab_size`` (the embedding's padding rows) are never generated: they are in
  the generation config's ``suppress_tokens``, as :func:`blackmamba.generate` masks them.

This file is copied into every folder that ``save_pretrained`` writes (``auto_map``, for
``trust_remote_code=True`` on a machine where ``blackmamba.hf`` is not imported); it needs the ``blackmamba``
package itself and imports nothing from ``blackmamba.hf``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from blackmamba.checkpoint import load_config, load_pretrained
from blackmamba.errors import BlackMambaError
from blackmamba.layers import MambaMixer, Mixer, MoE, RMSNorm
from blackmamba.model import BlackMamba, InferenceCache

from .cache_blackmamba import BlackMambaCache
from .configuration_blackmamba import BlackMambaHFConfig

# from_pretrained arguments that mean nothing for a local native checkpoint (hub and loading options).
_IGNORED_ARGS = (
    "revision", "cache_dir", "force_download", "proxies", "local_files_only", "token", "trust_remote_code",
    "code_revision", "low_cpu_mem_usage", "use_safetensors", "_from_auto", "_from_pipeline", "_commit_hash",
    "attn_implementation", "output_loading_info", "weights_only", "offload_folder", "offload_state_dict",
)  # fmt: skip
# from_pretrained arguments the native loader cannot honour (refused when set).
_UNSUPPORTED_ARGS = ("quantization_config", "gguf_file", "tp_plan", "key_mapping", "variant", "max_memory")


class HFError(BlackMambaError, ValueError):
    """A transformers-side argument BlackMamba cannot honour; the message names it."""


@dataclass
class BlackMambaCausalLMOutput(ModelOutput):
    """``logits`` (B, L, V); ``loss`` the mean next-token loss plus ``aux_loss`` (the router losses when the
    config enables them, in training); ``cache`` the recurrent state to continue from; ``expert_counts``
    (n_moe_blocks, E) tokens per expert (None from a decode step)."""

    loss: Tensor | None = None
    logits: Tensor | None = None
    cache: BlackMambaCache | None = None
    aux_loss: Tensor | None = None
    expert_counts: Tensor | None = None


def _unwrap(module: nn.Module) -> nn.Module:
    """The mixer inside adapter wrappers (PEFT's keep theirs in ``base_layer``)."""
    while not isinstance(module, Mixer) and isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _left_padded(mask: Tensor) -> bool:
    """Every row is zeros then ones (a left-padded batch)."""
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


def native_checkpoint_dir(name: Any) -> Path | None:
    """The folder ``name`` when it is a native checkpoint (a ``config.json`` without ``model_type``: the
    released layout or ours), else None (a transformers folder, a hub id, anything else)."""
    try:
        path = Path(name)
        file = path / "config.json"
        if not file.is_file() or file.stat().st_size > 16 * 2**20:
            return None
        data = json.loads(file.read_bytes())
    except (TypeError, OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or "model_type" in data:
        return None
    return path if "mamba_moe_layers" in data or "layer_pattern" in data else None


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, dtype.removeprefix("torch."))
    raise HFError(f"dtype must be 'auto', a torch dtype or its name, got {dtype!r}")


def _device(device_map: Any) -> torch.device | None:
    """The one device a ``device_map`` names (the native loader puts the whole model on one device)."""
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise HFError(f"device_map must put the whole model on one device ({{'': device}}), got {device_map!r}")
        device_map = device_map[""]
    try:
        return torch.device(device_map)
    except (TypeError, RuntimeError) as e:
        raise HFError(f"device_map {device_map!r} is not a device: {e}") from None


class BlackMambaForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`blackmamba.BlackMamba` behind transformers' causal-LM interface. Build one around an existing
    native model with :meth:`from_native` (no copy), or load one with ``from_pretrained``."""

    config_class = BlackMambaHFConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _is_stateful = True  # transformers refuses assisted decoding (it needs to roll the state back)
    _no_split_modules = ["Block"]
    # Regular expressions over parameter names: kept fp32 when loading in bf16/fp16, as cast_model does.
    _keep_in_fp32_modules_strict = [r"mixer\.A_log$", r"mixer\.D$", r"mixer\.dt_proj\.bias$"]

    def __init__(self, config: BlackMambaHFConfig, model: BlackMamba | None = None) -> None:
        super().__init__(config)
        if config.quantization is not None:
            raise HFError(
                f"the transformers bridge does not load {config.quantization} weight-only models; use blackmamba's "
                "own generate, eval or serve, or the unquantized checkpoint"
            )
        native = BlackMamba(config.to_native()) if model is None else model
        if model is not None and model.config != config.to_native():
            raise HFError("the native model's config differs from the transformers config it is wrapped with")
        self.embedding = native.embedding
        self.layers = native.layers
        self.final_norm = native.final_norm
        # Not a submodule: its parameters are the ones registered above.
        self.__dict__["native"] = native
        if model is not None:  # already initialised: transformers' post_init must leave the weights alone
            for module in self.modules():
                module._is_hf_initialized = True
        self.post_init()
        self.generation_config = self._with_suppressed_ids(self.generation_config)

    native: BlackMamba

    @classmethod
    def from_native(cls, model: BlackMamba, **config_kwargs: Any) -> BlackMambaForCausalLM:
        """Wrap ``model`` (same parameters, no copy); ``config_kwargs`` set transformers fields such as
        ``eos_token_id``. The wrapper follows the model's training mode."""
        wrapper = cls(BlackMambaHFConfig.from_native(model.config, **config_kwargs), model=model)
        return wrapper.train(model.training)

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, which also reads a native checkpoint folder (released or ours)."""
        path = native_checkpoint_dir(pretrained_model_name_or_path)
        if path is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if model_args:
            raise HFError("from_pretrained of a native BlackMamba checkpoint takes no positional model arguments")
        return cls._from_native_folder(path, dict(kwargs))

    @classmethod
    def _from_native_folder(cls, path: Path, kwargs: dict[str, Any]) -> BlackMambaForCausalLM:
        dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        device = _device(kwargs.pop("device_map", None))
        config = kwargs.pop("config", None)
        subfolder = kwargs.pop("subfolder", None)
        if subfolder:
            path = path / subfolder
        for name in _IGNORED_ARGS:
            kwargs.pop(name, None)
        if (kwargs.pop("adapter_kwargs", None) or {}).get("_adapter_model_path"):
            raise HFError(f"{path}: a PEFT adapter inside a native checkpoint folder is not supported")
        for name in _UNSUPPORTED_ARGS:
            if kwargs.pop(name, None) is not None:
                raise HFError(f"{name} is not supported when loading a native BlackMamba checkpoint ({path})")
        quantization = load_config(path).quantization
        if quantization is not None:
            raise HFError(
                f"{path} holds {quantization} weights: the transformers bridge does not load quantized models; "
                "use blackmamba's own generate, eval or serve, or the unquantized checkpoint"
            )
        native = load_pretrained(path, dtype=_torch_dtype(dtype if dtype is not None else torch_dtype))
        if not isinstance(config, BlackMambaHFConfig):
            config = BlackMambaHFConfig.from_pretrained(path)
        for name, value in kwargs.items():  # like transformers: other keywords override config fields
            if not hasattr(config, name):
                raise HFError(f"from_pretrained got an unknown argument {name!r}")
            setattr(config, name, value)
        model = cls(config, model=native)
        if (path / "generation_config.json").is_file():
            model.generation_config = model._with_suppressed_ids(GenerationConfig.from_pretrained(path))
        return model.to(device or "cpu").eval()

    def _with_suppressed_ids(self, generation_config: GenerationConfig) -> GenerationConfig:
        """The ids past the tokenizer (the embedding's padding rows) are never generated."""
        usable = self.config.tokenizer_vocab_size
        if usable is not None and usable < self.config.vocab_size and not generation_config.suppress_tokens:
            generation_config.suppress_tokens = list(range(usable, self.config.vocab_size))
        return generation_config

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The native initialisation (transformers calls this for modules it did not load)."""
        native = self.config.to_native()
        if isinstance(module, Mixer) and hasattr(module, "reset_parameters"):
            module.reset_parameters(native)  # its Linear and Conv1d children included
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=native.initializer_range)
        elif isinstance(module, RMSNorm | nn.LayerNorm):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------ modules

    def train(self, mode: bool = True) -> BlackMambaForCausalLM:
        super().train(mode)
        self.native.training = mode  # the native model is not a submodule; its own flag gates checkpointing
        return self

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """Activation checkpointing is the native model's (every block, non-reentrant)."""
        if every_n_layers != 1:
            raise HFError("BlackMamba checkpoints every block; every_n_layers must be 1")
        self.native.gradient_checkpointing = enable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.native.gradient_checkpointing

    @property
    def is_gradient_checkpointing(self) -> bool:  # the name PEFT still reads
        return self.native.gradient_checkpointing

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value
        self.native.embedding = value

    def get_output_embeddings(self) -> None:
        return None  # the head is the input embedding (tied), not a module of its own

    def _plain_mixers(self) -> bool:
        """Whether every block still holds its own mixer (no adapter wrapped around one): the native decode
        step calls the mixers' own step methods, which an adapter wrapping a whole mixer (PEFT's LoRA on
        the expert weights) does not see, so such a model decodes through the forward instead."""
        plain = True
        for i, block in enumerate(self.layers):
            mixer = block.mixer
            if isinstance(mixer, MoE) and type(mixer.router) is not nn.Linear:
                raise HFError(f"layers.{i}.mixer.router is wrapped ({type(mixer.router).__name__}); the routing "
                              "kernels read its weight directly, so an adapter there would be ignored")  # fmt: skip
            if isinstance(mixer, MambaMixer):
                for name in ("dt_proj", "conv1d"):
                    if type(getattr(mixer, name)) not in (nn.Linear, nn.Conv1d):
                        raise HFError(f"layers.{i}.mixer.{name} is wrapped; the scan kernels read its weight "
                                      "directly, so an adapter there would be ignored")  # fmt: skip
            plain = plain and isinstance(mixer, Mixer)
        return plain

    # ------------------------------------------------------------------------------ forward

    def new_cache(self, batch_size: int, device: torch.device | None = None) -> BlackMambaCache:
        """A zeroed recurrent state for ``batch_size`` sequences (each mixer's, through any adapter)."""
        device = device or self.native.device
        if self._plain_mixers():
            state = self.native.allocate_cache(batch_size, device=device)
        else:
            state = InferenceCache([_unwrap(b.mixer).allocate_cache(batch_size, device) for b in self.layers])
        return BlackMambaCache(state, len(self.layers))

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: BlackMambaCache | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> BlackMambaCausalLMOutput | tuple:
        """input_ids (B, L) -> logits (B, L, V). With ``use_cache`` (the default outside training) the sequences
        continue from ``cache`` (a new one when None) and the output carries it; a one-token call on a cache
        that has seen tokens is the native decode step. ``attention_mask`` marks real tokens; with a cache the
        padding must be on the left. ``labels`` give the shifted next-token loss (-100 ignored)."""
        if inputs_embeds is not None:
            raise HFError("inputs_embeds is not supported: BlackMamba takes token ids (input_ids)")
        if input_ids is None:
            raise HFError("input_ids is required")
        if output_hidden_states:
            raise HFError("output_hidden_states is not supported by BlackMamba")
        if kwargs.get("output_attentions"):
            raise HFError("BlackMamba has no attention weights (output_attentions)")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = self.new_cache(input_ids.shape[0], input_ids.device)
        plain = self._plain_mixers()
        length = input_ids.shape[1]
        aux_loss = expert_counts = None
        if cache is not None and cache.seen_tokens > 0 and length == 1 and plain:
            logits = self.native.step(input_ids[:, 0], cache.state)[:, None]
        else:
            mask = None
            if attention_mask is not None and length > 0:
                mask = attention_mask[:, -length:].bool()
                if bool(mask.all()):
                    mask = None
                elif not _left_padded(mask):
                    if cache is not None:
                        raise HFError("right padding cannot continue a recurrent state: pad on the left "
                                      "(tokenizer.padding_side = 'left') or pass use_cache=False")  # fmt: skip
                    mask = None  # causal: no real position sees the padding after it
            keep = logits_to_keep if isinstance(logits_to_keep, int) else 0
            out = self.native(input_ids, cache=None if cache is None else cache.state, mask=mask, num_last_tokens=keep)
            logits, aux_loss, expert_counts = out.logits, out.aux_loss, out.expert_counts
        if isinstance(logits_to_keep, Tensor):
            logits = logits[:, logits_to_keep]
        if cache is not None:
            cache.seen_tokens += length
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if aux_loss is not None:
                loss = loss + aux_loss
        output = BlackMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            aux_loss=aux_loss,
            expert_counts=expert_counts,
        )
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------------------ generation

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # no DynamicCache: the state is a BlackMambaCache

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict[str, Any],
        generation_mode: Any,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """A zeroed state for every row generate will run (beams and returned sequences included), made before
        the prefill so that a chunked prefill (``prefill_chunk_size``) carries it from chunk to chunk. A cache
        passed in continues from its state: pass only the tokens that follow it."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
            return
        rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        model_kwargs["cache"] = self.new_cache(rows)

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, cache: BlackMambaCache | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        # The state holds the past: positions mean nothing to the model, and decode steps need no mask.
        inputs.pop("position_ids", None)
        inputs.pop("cache_position", None)
        if cache is not None and cache.seen_tokens > 0 and inputs["input_ids"].shape[1] == 1:
            inputs.pop("attention_mask", None)
        return inputs


__all__ = ["BlackMambaCausalLMOutput", "BlackMambaForCausalLM", "HFError", "native_checkpoint_dir"]
