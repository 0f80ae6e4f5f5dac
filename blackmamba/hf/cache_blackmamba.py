"""The recurrent state of a batch as a transformers ``Cache``, so that ``generate`` carries it between steps.

BlackMamba has no KV cache: each Mamba block keeps a conv window and an SSM state of constant size, the MoE
blocks keep nothing. :class:`BlackMambaCache` holds the native :class:`~blackmamba.model.InferenceCache` of
the batch (one slot per row) and answers what transformers' generation asks of a cache: every layer is
"linear" (no sequence dimension, so generate never slices the prompt by a cached length), it is not
compileable, it cannot be cropped (a recurrent state cannot be rolled back, so assisted decoding is refused),
and beam search reorders it (:meth:`reorder_cache` permutes the slots).

This file is copied into every folder that ``save_pretrained`` writes (for ``trust_remote_code=True``).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from blackmamba.model import InferenceCache


class BlackMambaCache(Cache):
    """The decode state of a batch of ``n_slots`` sequences (row b of the batch is slot b) and the number of
    tokens it has consumed (:meth:`get_seq_length`)."""

    def __init__(self, state: InferenceCache, n_blocks: int) -> None:
        super().__init__(layers=[])
        self.state = state
        self.n_blocks = n_blocks
        self.seen_tokens = 0

    def __repr__(self) -> str:
        return f"BlackMambaCache(slots={self.state.n_slots}, blocks={self.n_blocks}, seen={self.seen_tokens})"

    def __len__(self) -> int:
        return self.n_blocks

    def _select(self, rows: Tensor) -> None:
        """Keep the slots ``rows`` (in that order): the new batch has ``len(rows)`` rows."""
        layers = [
            None if s is None else dataclasses.replace(
                s, **{f.name: getattr(s, f.name).index_select(0, rows.to(getattr(s, f.name).device))
                      for f in dataclasses.fields(s)}
            )
            for s in self.state.layers
        ]  # fmt: skip
        self.state = InferenceCache(layers)

    # ---------------------------------------------------------------- what generate asks of a cache

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # a recurrent state has no length limit

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.seen_tokens > 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    def reset(self) -> None:
        self.state.reset()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b continues the sequence of row ``beam_idx[b]``."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self.state.n_slots
        device = next(self.state.tensors()).device
        self._select(torch.arange(n, device=device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped (rolled back to an earlier position)")

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a recurrent state cannot record its past (assisted decoding needs it)")

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        pass

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        pass

    @property
    def batch_size(self) -> int:
        return self.state.n_slots

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.n_blocks

    @property
    def is_linear(self) -> list[bool]:
        return [True] * self.n_blocks

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * self.n_blocks


__all__ = ["BlackMambaCache"]
