"""AdapterFusion, stage 2 (Pfeiffer et al. 2021, EACL, Sec. 3.2 and Eq. 2-5).

In every adapter site, N frozen source adapters are mixed by a learned attention:
    q = Q x + b_Q,  k_n = K z_n + b_K,  v_n = V z_n,   z_n = adapter n's output (up projection)
    s_n = q . k_n   (no 1/sqrt(d)),  p = softmax(s / T),  out = sum_n p_n v_n
with x the site's input to the adapters (for Pfeiffer's placement: the FFN sub-layer output
after the pretrained LayerNorm) and V initialised to identity (+1e-6 off the diagonal),
pulled toward identity by 0.01 * sum_l ||I - V_l||_F^2 added to the loss. `static` has no V.

Computed without the 2N d^2 per-token cost of forming every k_n and v_n (exact, not an
approximation): with z_n = U_n a_n + c_n and a_n = f(D_n x + e_n),
    s_n = (K^T q) . z_n + q . b_K = (U_n^T K^T q) . a_n + (K^T q) . c_n + q . b_K
    sum_n p_n v_n = V (U_cat (p (x) a) + C p)
so a token costs three d x d products (Q, K^T q, V) whatever N is, plus O(N m d) for the
adapters' own bottlenecks, which run as one batched matmul over the stacked D_n and U_n.
`FusionMixer.literal` keeps the textbook form for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapterbench.errors import UserError
from adapterbench.methods.bottleneck import (
    BottleneckAdapter,
    _Site,
    add_adapter,
    load_adapter_state,
)
from adapterbench.methods.contract import Artifact
from adapterbench.models import bert_init

KIND = "fusion"
STAGE = "fuse"
ARTIFACT = Artifact("fusion", "fusion_config.json", "fusion.safetensors")
SUPPORTS = frozenset({"bench"})
TRAIN_DEFAULTS = {"lr": 5e-5, "epochs": 10}  # "lr 5e-5 in all experiments", up to 10 epochs
IDENTITY_AT_INIT = None  # mixes adapter outputs (tested against the textbook formula)


@dataclass
class Config:
    name: str = "fusion"
    adapters: list[str] = field(default_factory=list)  # source adapter or run folders
    variant: str = "dynamic"         # dynamic: Q, K, V; static: Q, K only
    temperature: bool = False        # start at T=50, anneal by T/1000 per training forward to 1
    attention_dropout: float = 0.1   # dropout on the scores before the softmax (AdapterHub: the model's
                                     # attention_probs_dropout_prob, 0.1 for BERT)
    reg_weight: float = 0.01         # weight of sum_l ||I - V_l||^2
    encoder: str | None = None       # a model folder whose weights the sources were trained on, when
                                     # that is not model.name's (Fusion w/ MT-A: the MT-A run's
                                     # multitask/base_model); None: model.name's weights


class FusionMixer(nn.Module):
    """The fusion attention of one site; called by the site with its input and adapters."""

    is_aux = True  # TaskModel hands it the attention mask and adds its penalty to the loss

    def __init__(self, hidden: int, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        bert_init(self.query, self.key)
        self.value = None
        if cfg.variant == "dynamic":
            self.value = nn.Linear(hidden, hidden, bias=False)
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout = nn.Dropout(cfg.attention_dropout)
        self.register_buffer("T", torch.tensor(50.0 if cfg.temperature else 1.0), persistent=False)
        self.record: list | None = None  # set to a list to collect (attention sum, token count)
        self.mask: torch.Tensor | None = None  # attention mask of the current batch (set by the model)

    def start_recording(self) -> None:
        """Collect the attention of the next forward passes (the loop does so while scoring dev)."""
        self.record = []

    def stop_recording(self) -> dict:
        """{'attention/source_n': mean attention over the recorded tokens}; recording off."""
        rec, self.record = self.record, None
        if not rec:
            return {}
        total, count = sum(r[0] for r in rec), sum(r[1] for r in rec)
        return {f"attention/source_{n}": float(v) / count for n, v in enumerate(total)}

    def penalty(self) -> torch.Tensor:
        if self.value is None:
            return self.query.weight.new_zeros(())
        eye = torch.eye(self.value.weight.shape[0], device=self.value.weight.device)
        return self.cfg.reg_weight * (eye - self.value.weight).pow(2).sum()

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        # T as a number: the softmax must not hold the buffer that the annealing below changes in place
        p = torch.softmax(self.dropout(scores) / float(self.T), dim=-1)
        if self.training and self.cfg.temperature:
            self.T.fill_(max(float(self.T) - 50.0 / 1000.0, 1.0))
        if self.record is not None:
            self._collect(p.detach())
        return p

    def _collect(self, p: torch.Tensor) -> None:
        m = self.mask
        if m is not None and m.shape == p.shape[:2]:
            w = m.to(p.dtype).unsqueeze(-1)
            self.record.append(((p * w).sum((0, 1)).float().cpu(), float(w.sum())))
        else:
            self.record.append((p.sum((0, 1)).float().cpu(), float(p.shape[0] * p.shape[1])))

    def forward(self, x: torch.Tensor, adapters: list[BottleneckAdapter]) -> torch.Tensor:
        n = len(adapters)
        D = torch.cat([a.down.weight for a in adapters])                  # (N m, d)
        e = torch.cat([a.down.bias for a in adapters])                    # (N m)
        U = torch.cat([a.up.weight for a in adapters], dim=1)             # (d, N m)
        C = torch.stack([a.up.bias for a in adapters], dim=1)             # (d, N)
        act = adapters[0].act
        a = act(nn.functional.linear(x, D, e))                            # (B, L, N m), one matmul
        q = self.query(x)                                                 # (B, L, d)
        r = q @ self.key.weight                                           # K^T q, (B, L, d)
        m = a.shape[-1] // n
        scores = ((r @ U) * a).unflatten(-1, (n, m)).sum(-1)              # (U_n^T K^T q) . a_n
        scores = scores + r @ C + (q @ self.key.bias).unsqueeze(-1)       # + (K^T q) . c_n + q . b_K
        p = self._softmax(scores)                                         # (B, L, N)
        pa = (a.unflatten(-1, (n, m)) * p.unsqueeze(-1)).flatten(-2)     # p_n a_n
        mixed = pa @ U.T + p @ C.T                                        # sum_n p_n z_n
        return self.value(mixed) if self.value is not None else mixed

    def literal_scores(self, x: torch.Tensor, adapters: list[BottleneckAdapter]) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, s): every source's output z_n, (B, L, N, d), and its score s_n = q . k_n, (B, L, N),
        formed per token as the paper writes them (for tests and scripts/fusion_probe.py)."""
        z = torch.stack([ad(x) for ad in adapters], dim=2)
        return z, (self.key(z) * self.query(x).unsqueeze(2)).sum(-1)

    def literal(self, x: torch.Tensor, adapters: list[BottleneckAdapter]) -> torch.Tensor:
        """The textbook computation: every k_n and v_n formed per token (for tests)."""
        z, scores = self.literal_scores(x, adapters)
        v = self.value(z) if self.value is not None else z
        p = self._softmax(scores)
        return (p.unsqueeze(-1) * v).sum(2)


# --- method interface ---------------------------------------------------------------------

def check(cfg: Config) -> None:
    if cfg.variant not in ("dynamic", "static"):
        raise UserError(f"method.variant '{cfg.variant}' must be dynamic or static")
    if not 0 <= cfg.attention_dropout < 1:
        raise UserError(f"method.attention_dropout {cfg.attention_dropout} must be in [0, 1)")


def apply(encoder, cfg: Config, names: list[str], sources=()) -> None:
    """Insert every source adapter (artifacts.load_sources) frozen, then one trainable mixer
    in every site."""
    check(cfg)
    if not sources:
        raise UserError("fusion needs source adapters: pass --adapters RUN_DIR [RUN_DIR ...]")
    meta = sources[0].meta
    if meta["model_type"] != encoder.config.model_type or meta["hidden_size"] != encoder.config.hidden_size:
        raise UserError(f"fusion sources were trained on {meta['base_model']}, "
                        f"not on this model: use --model {meta['base_model']}")
    use_source_encoder(encoder, cfg, meta["base_model"], sources[0].path)
    encoder.requires_grad_(False)
    for s in sources:
        bcfg = s.bottleneck()
        add_adapter(encoder, bcfg, s.name)
        load_adapter_state(encoder, bcfg, s.name, s.state)
    encoder.requires_grad_(False)
    for site in sites(encoder):
        site.mixer = FusionMixer(encoder.config.hidden_size, cfg)


def use_source_encoder(encoder, cfg: Config, trained_on: str, source: str) -> None:
    """The encoder the sources were trained on. Adapters trained jointly with the encoder
    (MT-A; Pfeiffer et al. 2021, Sec. 2.2: the shared parameters are learned with them) only
    mean something on that fine-tuned encoder, which their folder names as `base_model`:
    `method.encoder` loads its weights into model.name's encoder (same architecture; the
    study sets it for Fusion w/ MT-A). Sources that name a model folder other than the one
    loaded are refused, so they are never fused on an encoder they were not trained on."""
    folder = Path(trained_on).expanduser()
    used = cfg.encoder or str(getattr(encoder, "name_or_path", "") or encoder.config.name_or_path)
    if folder.is_dir() and (folder / "config.json").is_file() and folder.resolve() != Path(used).expanduser().resolve():
        raise UserError(f"fusion source {source} was trained on the encoder in {trained_on}, not on "
                        f"{used}: set method.encoder={trained_on} (or --model {trained_on})")
    if cfg.encoder:
        from adapterbench.models import load_encoder_weights
        load_encoder_weights(encoder, cfg.encoder)


def sites(encoder) -> list[_Site]:
    return [m for m in encoder.modules() if isinstance(m, _Site)]


def mixers(encoder) -> list[FusionMixer]:
    return [s.mixer for s in sites(encoder) if isinstance(s.mixer, FusionMixer)]


def trainable_state(encoder, cfg: Config, names: list[str]) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, mx in enumerate(mixers(encoder))
            for k, v in mx.state_dict().items()}


def load_state(encoder, cfg: Config, names: list[str], state: dict) -> None:
    for i, mx in enumerate(mixers(encoder)):
        own = {k[len(f"{i}."):]: v for k, v in state.items() if k.startswith(f"{i}.")}
        try:
            mx.load_state_dict(own)
        except RuntimeError:
            raise UserError("fusion weights do not match the fusion config or the sources: "
                            "the fusion/ folder was changed or comes from another run") from None


def attention_table(encoder) -> tuple[list[str], list[list[float]]]:
    """(source names, per-site mean attention) from the mixers' records."""
    names = None
    rows = []
    for site in sites(encoder):
        mx = site.mixer
        if not isinstance(mx, FusionMixer) or not mx.record:
            continue
        names = names or list(site.adapters)
        total = sum(r[0] for r in mx.record)
        count = sum(r[1] for r in mx.record)
        rows.append([float(x) / count for x in total])
    return names or [], rows
