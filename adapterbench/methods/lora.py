"""LoRA (Hu et al. 2021, arXiv 2106.09685, Eq. 3): a frozen projection W gets a trainable
low-rank update, h = W x + (alpha / r) B A x, with A (r x d_in) initialised as peft does
(Kaiming-uniform, a = sqrt(5)) and B (d_out x r) at zero, so the model starts unchanged.
Dropout (`dropout`) acts on x before A, as in peft. Targets are named through the
architecture table (`models.ARCHITECTURES`): query, key, value, attn_output, ffn_output;
default query and value (the paper's choice). Trained: the LoRA factors and the head.

Our own module rather than peft's `LoraModel`: it is a few lines, wraps the table's submodules
like every other method here, and needs no extra dependency at run time; peft is used to
prove the export (`adapterbench export --format peft`, tests/test_lora.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from adapterbench.errors import UserError
from adapterbench.methods.contract import Artifact
from adapterbench.models import arch_of, get_sub, set_sub

KIND = "lora"
STAGE = "extract"
ARTIFACT = Artifact("adapter", "adapter_config.json", "adapter.safetensors")
SUPPORTS = frozenset({"init_from", "export:peft", "bench"})
TRAIN_DEFAULTS = {"lr": 5e-4, "epochs": 30}   # Hu et al. 2021, GLUE with RoBERTa-base: lr 4e-4 to 5e-4
IDENTITY_AT_INIT = {}
TARGETS = {"query": "query", "key": "key", "value": "value", "attn_output": "attn_proj", "ffn_output": "ffn_proj"}


@dataclass
class Config:
    name: str = "lora"
    rank: int = 8                    # r
    alpha: float = 16.0              # scaling alpha / r
    dropout: float = 0.1             # on the input of A (peft's lora_dropout)
    target_modules: list[str] = field(default_factory=lambda: ["query", "value"])


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.base(x) + (self.dropout(x) @ self.lora_A.T.to(x.dtype) @ self.lora_B.T.to(x.dtype)) * self.scaling


def check(cfg: Config) -> None:
    bad = [t for t in cfg.target_modules if t not in TARGETS]
    if bad or not cfg.target_modules:
        raise UserError(f"method.target_modules {cfg.target_modules} must name some of {', '.join(TARGETS)}")
    if cfg.rank < 1 or cfg.alpha <= 0 or not 0 <= cfg.dropout < 1:
        raise UserError(f"method.rank ({cfg.rank}) must be at least 1, method.alpha ({cfg.alpha}) positive "
                        f"and method.dropout ({cfg.dropout}) in [0, 1)")


def sites(encoder, cfg: Config) -> list[tuple[str, str]]:
    """(key like '3.query', module path) of every targeted projection."""
    arch = arch_of(encoder)
    out = []
    for i in range(len(get_sub(encoder, arch.layers))):
        for t in cfg.target_modules:
            rel = getattr(arch, TARGETS[t])
            if rel is None:
                raise UserError(f"LoRA target '{t}' has no entry for '{encoder.config.model_type}' in "
                                f"models.ARCHITECTURES: choose other method.target_modules")
            out.append((f"{i}.{t}", f"{arch.layers}.{i}.{rel}"))
    return out


def apply(encoder, cfg: Config, names: list[str], sources=()) -> None:
    check(cfg)
    encoder.requires_grad_(False)
    for _, path in sites(encoder, cfg):
        base = get_sub(encoder, path)
        if not isinstance(base, nn.Linear):
            raise UserError(f"LoRA target {path} is a {type(base).__name__}, not a Linear layer")
        set_sub(encoder, path, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))


def trainable_state(encoder, cfg: Config, names: list[str]) -> dict:
    out = {}
    for key, path in sites(encoder, cfg):
        mod = get_sub(encoder, path)
        out[f"{key}.lora_A"], out[f"{key}.lora_B"] = mod.lora_A.detach().clone(), mod.lora_B.detach().clone()
    return out


@torch.no_grad()
def load_state(encoder, cfg: Config, names: list[str], state: dict) -> None:
    state = dict(state)
    for key, path in sites(encoder, cfg):
        mod = get_sub(encoder, path)
        for part in ("lora_A", "lora_B"):
            value = state.pop(f"{key}.{part}", None)
            if value is None or value.shape != getattr(mod, part).shape:
                raise UserError(f"LoRA weights lack '{key}.{part}' of shape {tuple(getattr(mod, part).shape)}: "
                                f"the file does not match its adapter_config.json")
            getattr(mod, part).copy_(value)
    if state:
        raise UserError(f"LoRA weights hold {len(state)} unexpected tensors (e.g. '{next(iter(state))}')")
