"""MT-A (Stickland & Murray 2019, as used by Pfeiffer et al. 2021): one Pfeiffer adapter per
task, trained jointly with the (fine-tuned) encoder on all tasks; each example goes through
its own task's adapter. The adapters can then be fused ("Fusion w/ MT-A")."""

from dataclasses import asdict, dataclass

from adapterbench.errors import UserError
from adapterbench.methods.bottleneck import BottleneckConfig, _Site, add_adapter
from adapterbench.methods.contract import Artifact
from adapterbench.methods.full import load_state, trainable_state  # noqa: F401  (the whole encoder is saved)

KIND = "multitask"
STAGE = "multitask"
ARTIFACT = Artifact("multitask", "multitask_config.json", "encoder.safetensors")
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 1e-4, "epochs": 3, "warmup_ratio": 0.1}
IDENTITY_AT_INIT = {"init": "zero"}


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


def apply(encoder, cfg: Config, tasks: list[str], sources=()) -> None:
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


def finalize(out, encoder, tokenizer, cfg, tasks) -> None:
    """For "Fusion w/ MT-A" (Pfeiffer et al. 2021): the jointly fine-tuned encoder without its
    adapters as a model folder (`base_model/`), and each task's adapter as an adapter folder
    (`adapters/<task>/`) whose base model is that folder, so `fuse --adapters .../adapters/*` works."""
    from dataclasses import asdict as as_dict

    from transformers import AutoModel

    from adapterbench import __version__
    from adapterbench.fileio import save_tensors, write_json
    from adapterbench.methods.bottleneck import adapter_state
    from adapterbench.methods.pfeiffer import Config as PfeifferConfig
    from adapterbench.models import resolve_model_path
    base_dir = out / "base_model"
    plain = {k.replace(".base.", "."): v for k, v in encoder.state_dict().items() if ".adapters." not in k}
    fresh = AutoModel.from_pretrained(resolve_model_path(cfg.model.name), trust_remote_code=cfg.model.trust_remote_code)
    missing, unexpected = fresh.load_state_dict(plain, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # unused; kept as pretrained so loading is quiet
    if missing or unexpected:
        raise UserError(f"cannot unwrap the MT-A encoder ({(missing or unexpected)[0]})")
    fresh.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    bcfg = bottleneck(cfg.method)
    adapter_method = as_dict(PfeifferConfig(reduction_factor=bcfg.reduction_factor, activation=bcfg.activation,
                                            init=bcfg.init))
    for t in tasks:
        folder = out / "adapters" / t.name
        save_tensors(folder / "adapter.safetensors", adapter_state(encoder, bcfg, t.name), {"format": "pt"})
        write_json(folder / "adapter_config.json", {
            "method": adapter_method, "base_model": str(base_dir.resolve()), "model_type": encoder.config.model_type,
            "hidden_size": encoder.config.hidden_size, "num_layers": encoder.config.num_hidden_layers,
            "task": t.name, "trained_as": "mt-a", "adapterbench_version": __version__})
