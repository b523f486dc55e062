"""Houlsby et al. 2019 (arXiv 1902.00751): two bottleneck adapters per layer, after the
attention and the feed-forward output projections, before the residual + LayerNorm.
Trained: adapters, every LayerNorm, the head. Init: truncated normal, std 1e-2 (Sec. 3.6).
The activation follows AdapterHub's "houlsby" preset (swish); the paper leaves it open.
"""

from dataclasses import asdict, dataclass

from .bottleneck import BottleneckConfig, adapter_state, apply_bottleneck, load_adapter_state

KIND = "adapter"
TRAIN_DEFAULTS = {"lr": 1e-4, "epochs": 30}


@dataclass
class Config:
    name: str = "houlsby"
    reduction_factor: float = 16.0   # m = hidden / 16 (48 for BERT-base, 24 for MiniLM)
    activation: str = "swish"
    init: str = "houlsby"            # truncated N(0, 1e-2), zero biases
    train_layer_norms: bool = True   # the paper trains the LayerNorms with the adapters


def bottleneck(cfg: Config) -> BottleneckConfig:
    return BottleneckConfig(placement="houlsby", **asdict(cfg))


def apply(encoder, cfg: Config, name: str) -> None:
    apply_bottleneck(encoder, bottleneck(cfg), name)


def trainable_state(encoder, cfg: Config, name: str) -> dict:
    return adapter_state(encoder, bottleneck(cfg), name)


def load_state(encoder, cfg: Config, name: str, state: dict) -> None:
    load_adapter_state(encoder, bottleneck(cfg), name, state)
