"""The paper's comparisons, re-runnable: BlackMamba against dense Mamba, a transformer and a transformer-MoE.

:mod:`.baselines` defines the four models as layer patterns over one config with equal active parameters;
:mod:`.paper` trains them at equal training FLOPs and measures quality, FLOPs and generation latency
(``blackmamba experiment paper``).
"""

from .baselines import KINDS, LABELS, active_parameters, kind_of, matched_config, matched_configs

__all__ = ["KINDS", "LABELS", "active_parameters", "kind_of", "matched_config", "matched_configs"]
