"""MT-A (Stickland & Murray 2019, as used by Pfeiffer et al. 2021): one Pfeiffer adapter per
task, trained jointly with the (fine-tuned) encoder on all tasks; each example goes through
its own task's adapter. The adapters can then be fused ("Fusion w/ MT-A")."""

from dataclasses import asdict, dataclass

from .bottleneck import BottleneckConfig, _Site, add_adapter
from .mtl import load_state, trainable_state  # noqa: F401  (the whole encoder is saved)

KIND = "multitask"
TRAIN_DEFAULTS = {"lr": 1e-4, "epochs": 3}


@dataclass
class Config:
    name: str = "mt-a"
    reduction_factor: float = 16.0
    activation: str = "relu"
    init: str = "bert"
    train_encoder: bool = True       # Stickland & Murray fine-tune the encoder with the adapters


def bottleneck(cfg: Config) -> BottleneckConfig:
    keys = {k: v for k, v in asdict(cfg).items() if k in ("reduction_factor", "activation", "init")}
    return BottleneckConfig(name="pfeiffer", placement="pfeiffer", **keys)


def apply(encoder, cfg: Config, tasks: list[str]) -> None:
    bcfg = bottleneck(cfg)
    bcfg.check()
    encoder.requires_grad_(cfg.train_encoder)
    for t in tasks:
        for adapter in add_adapter(encoder, bcfg, t):
            adapter.requires_grad_(True)
    for site in encoder.modules():
        if isinstance(site, _Site):
            site.route = list(tasks)


def set_tasks(encoder, task_ids) -> None:
    for site in encoder.modules():
        if isinstance(site, _Site):
            site.task_ids = task_ids
