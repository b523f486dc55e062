"""Houlsby et al. 2019 (arXiv 1902.00751): two bottleneck adapters per layer, after the
attention and the feed-forward output projections, before the residual + LayerNorm.
Trained: adapters, every LayerNorm, the head. Init: truncated normal, std 1e-2 (Sec. 3.6).
The activation follows AdapterHub's "houlsby" preset (swish); the paper leaves it open.
"""

from dataclasses import dataclass

from adapterbench.methods.bottleneck import preset_functions
from adapterbench.methods.contract import Artifact

KIND = "adapter"
STAGE = "extract"
ARTIFACT = Artifact("adapter", "adapter_config.json", "adapter.safetensors")
SUPPORTS = frozenset({"fusion_source", "merge", "init_from", "export:adapterhub", "bench"})
TRAIN_DEFAULTS = {"lr": 1e-4, "epochs": 30}
IDENTITY_AT_INIT = {"init": "zero"}


@dataclass
class Config:
    name: str = "houlsby"
    reduction_factor: float = 16.0   # m = hidden / 16 (48 for BERT-base, 24 for MiniLM)
    activation: str = "swish"
    init: str = "houlsby"            # truncated N(0, 1e-2), zero biases
    train_layer_norms: bool = True   # the paper trains the LayerNorms with the adapters


bottleneck, apply, trainable_state, load_state = preset_functions("houlsby")
