"""Pfeiffer et al. 2021 (AdapterFusion, EACL), the ST-A adapter: one bottleneck after the
feed-forward block with the pretrained LayerNorm before and after it (their Fig. 2),
ReLU, reduction factor 16. Trained: the adapter and the head; the encoder stays frozen.
"""

from dataclasses import dataclass

from adapterbench.methods.bottleneck import preset_functions
from adapterbench.methods.contract import Artifact

KIND = "adapter"
STAGE = "extract"
ARTIFACT = Artifact("adapter", "adapter_config.json", "adapter.safetensors")
SUPPORTS = frozenset({"fusion_source", "merge", "init_from", "export:adapterhub", "bench"})
TRAIN_DEFAULTS = {"lr": 1e-4, "epochs": 30}  # AdapterFusion stage 1: lr 1e-4, up to 30 epochs
IDENTITY_AT_INIT = {"init": "zero"}


@dataclass
class Config:
    name: str = "pfeiffer"
    reduction_factor: float = 16.0   # rf 16 in the paper's main table (also 2 and 64)
    activation: str = "relu"
    init: str = "bert"               # N(0, 0.02), zero biases (AdapterHub's default)
    train_layer_norms: bool = False  # the pretrained LayerNorms stay frozen


bottleneck, apply, trainable_state, load_state = preset_functions("pfeiffer")
