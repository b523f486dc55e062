"""CA-MTL (Pilault, El hattami, Pal; ICLR 2021): a task embedding drives FiLM-style
modules, (1 + gamma_t) * x + beta_t with (gamma_t, beta_t) = W z_t + b, in
- conditional alignment: on the embedding layer's output;
- conditional attention: a task-modulated block-diagonal bias added to every layer's
  attention scores; as the reference code, N = hidden // max_length blocks (at least 1) of
  ceil(max_length / N) tokens (`attn_blocks` overrides N; the reference's "hidden size
  divisible by the sequence length" requirement is not needed here);
- conditional LayerNorm (reference form): LN(x; weight (1 + gamma_t) * w + beta_t, bias b);
- a conditional bottleneck adapter (d -> d/3 -> d, no nonlinearity, FiLM on its input) in
  the top layer, at Pfeiffer's place.
The embeddings and the lower layers are frozen (`freeze_layers`; -1: the lower half). As the
reference's `--freeze_encoder_layers`, the conditional parts inside the frozen layers (their
attention bias and FiLM maps) still train (`frozen_conditional_trains`; false freezes them with
their layer, as this package did before). The reference README's final setting for BERT-base is
layers 0-4 of 12 frozen (its June and July 2021 versions said 0-5, then N=5): scaled to
MiniLM's 6 layers that is `freeze_layers: 2`. Its epoch is the longest task's batches times the
number of tasks (`sampling.epoch: reference`) and it trains 5 epochs.
Initialisation (`init`): `reference` as the reference code (BERT's init_weights): the task
embedding, the task transform and every FiLM map N(0, 0.02) with zero biases, so the task
vector has norm ~0.02^2 d^1.5 (0.15 for d = 384) and the model is close to, not equal to, the
base model at step 0; `identity`: every FiLM map zero, the model equals the base model.
Our deviations: the top layer keeps its pretrained weights instead of being re-initialised,
and the top adapter's up-projection starts at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from adapterbench.errors import UserError
from adapterbench.methods.bottleneck import NormSite
from adapterbench.methods.contract import Artifact
from adapterbench.methods.full import load_state, trainable_state  # noqa: F401  (the whole encoder is saved)
from adapterbench.methods.mtl import frozen_layers
from adapterbench.models import arch_of, bert_init, get_sub, set_sub

KIND = "multitask"
STAGE = "multitask"
ARTIFACT = Artifact("multitask", "multitask_config.json", "encoder.safetensors")
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 2e-5, "epochs": 5, "warmup_ratio": 0.1}  # reference: lr 2e-5, 5 epochs, 10% warm-up
IDENTITY_AT_INIT = {"init": "identity"}
INITS = ("reference", "identity")


@dataclass
class Config:
    name: str = "camtl"
    freeze_layers: int = -1          # layers 0..n-1 and the embeddings frozen; -1 = the lower half
    attn_blocks: int = 0             # blocks of the conditional attention bias; 0 = hidden // max_length
    max_length: int = 128            # size of the attention-bias parameter (longer inputs are cut to it)
    adapter_ratio: int = 3           # top-layer adapter bottleneck d / 3
    init: str = "reference"          # reference: N(0, 0.02) as the CA-MTL code | identity: FiLM maps zero
    frozen_conditional_trains: bool = True   # the reference's freeze_encoder_layers: the conditional parts
                                     # of the frozen layers (attention bias, FiLM maps) still train;
                                     # false: frozen with their layer (this package before the fix)


class TaskContext(nn.Module):
    """Task embeddings z_t = T e_t, shared by every conditional module (read per batch)."""

    def __init__(self, n_tasks: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_tasks, dim)
        self.transform = nn.Linear(dim, dim)
        bert_init(self.embedding, self.transform)   # as the reference
        self.task_ids: torch.Tensor | None = None  # set by the model before each forward

    def z(self) -> torch.Tensor:
        if self.task_ids is None:
            raise RuntimeError("CA-MTL needs task ids: call the multi-task model, not the encoder alone")
        return self.transform(self.embedding(self.task_ids))


class FiLM(nn.Module):
    """(1 + gamma) * x + beta, gamma and beta linear in the task embedding (per example)."""

    def __init__(self, ctx: TaskContext, dim: int, task_dim: int, init: str = "reference"):
        super().__init__()
        self.ctx = [ctx]  # a list: shared, not a submodule of every FiLM
        self.map = nn.Linear(task_dim, 2 * dim)
        bert_init(self.map)
        if init == "identity":
            nn.init.zeros_(self.map.weight)

    def gamma_beta(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.map(self.ctx[0].z()).chunk(2, dim=-1)              # (B, dim) each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.gamma_beta()
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        return (1 + gamma.view(shape)) * x + beta.view(shape)


class CondLayerNorm(nn.Module):
    """The reference's conditional LayerNorm: the LayerNorm weight is FiLM-modulated per task,
    LN(x) = norm(x) * ((1 + gamma_t) * w + beta_t) + b."""

    def __init__(self, base: nn.LayerNorm, film: FiLM):
        super().__init__()
        self.base = base
        self.film = film

    def forward(self, x):
        gamma, beta = self.film.gamma_beta()                              # (B, d)
        weight = (1 + gamma) * self.base.weight + beta
        normed = nn.functional.layer_norm(x, self.base.normalized_shape, None, None, self.base.eps)
        return normed * weight.unsqueeze(1).to(normed.dtype) + self.base.bias


class CondAttentionBias(nn.Module):
    """A task-modulated block-diagonal L x L bias added to one layer's attention scores."""

    def __init__(self, ctx: TaskContext, max_length: int, blocks: int, task_dim: int, init: str = "reference"):
        super().__init__()
        self.block = math.ceil(max_length / blocks)
        self.blocks = blocks
        self.weight = nn.Parameter(torch.zeros(blocks * self.block, self.block))
        self.film = FiLM(ctx, self.block, task_dim, init)

    def bias(self, length: int) -> torch.Tensor:
        w = self.film(self.weight.unsqueeze(0).expand(self.film.ctx[0].task_ids.shape[0], -1, -1))
        blocks = w.view(w.shape[0], self.blocks, self.block, self.block)          # (B, N, blk, blk)
        eye = torch.eye(self.blocks, device=w.device, dtype=w.dtype)
        full = torch.einsum("bnij,nm->bnimj", blocks, eye).reshape(w.shape[0], self.blocks * self.block, -1)
        return full[:, :length, :length].unsqueeze(1)                             # (B, 1, L, L)

    def hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        length = hidden.shape[1]
        if length > self.blocks * self.block:
            raise UserError(f"CA-MTL attention bias covers {self.blocks * self.block} tokens, the batch has "
                            f"{length}: raise method.max_length")
        bias = self.bias(length).to(hidden.dtype)
        positional = "attention_mask" not in kwargs and len(args) > 1   # MPNet passes it by position
        mask = args[1] if positional else kwargs.get("attention_mask")
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(hidden.dtype).min).to(hidden.dtype) + bias
        else:
            mask = mask + bias
        if positional:
            return (args[0], mask, *args[2:]), kwargs
        kwargs["attention_mask"] = mask
        return args, kwargs


class CondAdapter(nn.Module):
    """Top-layer bottleneck: up(down(FiLM(x))), no nonlinearity (as in the reference code)."""

    def __init__(self, film: FiLM, hidden: int, bottleneck: int):
        super().__init__()
        self.film = film
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        bert_init(self.down, self.up)
        nn.init.zeros_(self.up.weight)  # starts as the identity

    def forward(self, x):
        return self.up(self.down(self.film(x)))


def blocks_of(cfg: Config, hidden: int) -> int:
    """The reference's rule: hidden // max_length blocks (at least one), unless set."""
    return cfg.attn_blocks or max(1, hidden // cfg.max_length)


def apply(encoder, cfg: Config, tasks: list[str], sources=()) -> None:
    """Insert the conditional modules; freeze the embeddings and the lower layers (with
    their conditional attention)."""
    arch = arch_of(encoder)
    if arch.attn_self is None:
        raise UserError(f"CA-MTL's conditional attention needs the attention module of "
                        f"'{encoder.config.model_type}' in the architecture table")
    if cfg.init not in INITS:
        raise UserError(f"method.init '{cfg.init}' must be one of {', '.join(INITS)}")
    if cfg.attn_blocks < 0 or cfg.max_length < 1 or cfg.adapter_ratio < 1:
        raise UserError("method.attn_blocks must be 0 or more, method.max_length and method.adapter_ratio at least 1")
    d = encoder.config.hidden_size
    layers = get_sub(encoder, arch.layers)
    n = len(layers)
    freeze = frozen_layers(cfg.freeze_layers, n)
    ctx = TaskContext(len(tasks), d)
    encoder.camtl_context = ctx
    align = FiLM(ctx, d, d, cfg.init)
    encoder.camtl_align = align
    encoder.embeddings.register_forward_hook(lambda m, i, out: align(out))
    encoder.camtl_attention = nn.ModuleList()
    for i in range(n):
        cab = CondAttentionBias(ctx, cfg.max_length, blocks_of(cfg, d), d, cfg.init)
        encoder.camtl_attention.append(cab)
        get_sub(layers[i], arch.attn_self).register_forward_pre_hook(cab.hook, with_kwargs=True)
    for i in range(max(freeze, n // 2), n):       # conditional LayerNorms in the upper layers
        for path in (arch.attn_norm, arch.ffn_norm):
            set_sub(layers[i], path, CondLayerNorm(get_sub(layers[i], path), FiLM(ctx, d, d, cfg.init)))
    site = NormSite(get_sub(layers[n - 1], arch.ffn_norm))
    site.adapters["camtl"] = CondAdapter(FiLM(ctx, d, d, cfg.init), d, max(1, d // cfg.adapter_ratio))
    set_sub(layers[n - 1], arch.ffn_norm, site)
    encoder.requires_grad_(False)
    for i in range(freeze, n):                    # the upper layers train, with their conditional parts
        layers[i].requires_grad_(True)
        encoder.camtl_attention[i].requires_grad_(True)
    for m in (ctx, align, site.adapters["camtl"]):
        m.requires_grad_(True)
    if cfg.frozen_conditional_trains:             # as the reference: a frozen layer's conditional parts train
        encoder.camtl_attention.requires_grad_(True)
        for m in encoder.modules():
            if isinstance(m, CondLayerNorm):
                m.film.requires_grad_(True)


def set_tasks(encoder, task_ids: torch.Tensor) -> None:
    encoder.camtl_context.task_ids = task_ids
