"""BitFit (Ben Zaken, Ravfogel, Goldberg; ACL 2022): fine-tune only the encoder's bias terms
(and the task head). An adapterbench method written against the public contract alone
(adapterbench/methods/contract.py), as a user would write one:

    adapterbench check-method examples/bitfit.py
    adapterbench extract --task rte --method examples/bitfit.py
    adapterbench run my_study.yaml --plugin examples/bitfit.py     # entries: {name: bitfit}

At step 0 the model is the pretrained one (the biases keep their values), so IDENTITY_AT_INIT
is {} (no setting needed). `method.only`: train every bias ("all", the paper's full BitFit) or
only the query and second feed-forward biases ("query_ffn", the paper's reduced variant, Sec. 4).
"""

from dataclasses import dataclass

from adapterbench.errors import UserError
from adapterbench.methods.contract import Artifact

KIND = "bias"
STAGE = "extract"
ARTIFACT = Artifact("adapter", "adapter_config.json", "adapter.safetensors")
SUPPORTS = frozenset()
TRAIN_DEFAULTS = {"lr": 1e-3, "epochs": 10}      # the paper: lr 1e-4..1e-3 for BERT-base
IDENTITY_AT_INIT = {}


@dataclass
class Config:
    name: str = "bitfit"
    only: str = "all"          # all | query_ffn


def _chosen(name: str, cfg: Config) -> bool:
    if not name.endswith(".bias"):
        return False
    if cfg.only == "all":
        return True
    return ".query." in name or ".q." in name or name.endswith("output.dense.bias") and "attention" not in name


def apply(encoder, cfg: Config, names, sources=()) -> None:
    if cfg.only not in ("all", "query_ffn"):
        raise UserError(f"method.only must be all or query_ffn, not {cfg.only!r}")
    for name, p in encoder.named_parameters():
        p.requires_grad_(_chosen(name, cfg))


def trainable_state(encoder, cfg: Config, names) -> dict:
    return {n: p.detach().clone() for n, p in encoder.named_parameters() if _chosen(n, cfg)}


def load_state(encoder, cfg: Config, names, state: dict) -> None:
    params = dict(encoder.named_parameters())
    for n, v in state.items():
        params[n].data.copy_(v)
