"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021) and the sites they live in.

An adapter is delta(x) = W_up f(W_down x + b_down) + b_up, added to its input
(Houlsby et al. 2019, Sec. 2.1: "project down, nonlinearity, project up, skip").

Two kinds of site wrap the submodules named in `models.ARCHITECTURES`:
- `ProjSite` wraps an output projection: h = proj(x); returns h + sum_n delta_n(h).
  Houlsby places one after the attention and one after the FFN output projection, before
  the residual and LayerNorm. (Dropout follows the adapter here, not before it: equal in
  eval mode, a minor difference while training.)
- `NormSite` wraps a sub-layer's LayerNorm, receiving s = sublayer(x) + x:
  u = LN(s); returns LN(s + sum_n delta_n(u)). This is Pfeiffer's placement with the
  pretrained LayerNorm before and after the adapter (AdapterHub's seq_bn: the adapter's
  own residual is the sub-layer output, and original_ln_after adds the layer input back).

Several adapters may share a site (fusion, multi-task); a site may hold a `mixer` that
combines their deltas instead of summing them (AdapterFusion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adapterbench.errors import UserError
from adapterbench.models import arch_of, bert_init, get_sub, set_sub

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU,
               "tanh": nn.Tanh, "leakyrelu": nn.LeakyReLU, "identity": nn.Identity}
INITS = ("bert", "houlsby", "zero")
PLACEMENTS = {  # site name -> (which Arch field to wrap, site class name)
    "houlsby": {"attn": ("attn_proj", "proj"), "ffn": ("ffn_proj", "proj")},
    "pfeiffer": {"ffn": ("ffn_norm", "norm")},
}


@dataclass
class BottleneckConfig:
    name: str = "pfeiffer"
    placement: str = "pfeiffer"         # pfeiffer: one adapter after the FFN; houlsby: two per layer
    reduction_factor: float = 16.0      # bottleneck m = hidden / reduction_factor
    activation: str = "relu"
    init: str = "bert"                  # bert: N(0, 0.02); houlsby: trunc. N(0, 1e-2); zero: W_up = 0
    train_layer_norms: bool = False     # Houlsby trains every layer's LayerNorms too

    def check(self) -> None:
        if self.placement not in PLACEMENTS:
            raise UserError(f"method.placement '{self.placement}' must be one of {', '.join(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"method.activation '{self.activation}' must be one of {', '.join(ACTIVATIONS)}")
        if self.init not in INITS:
            raise UserError(f"method.init '{self.init}' must be one of {', '.join(INITS)}")
        if not self.reduction_factor > 0:
            raise UserError(f"method.reduction_factor {self.reduction_factor} must be positive")


class BottleneckAdapter(nn.Module):
    """delta(x) = W_up f(W_down x + b_down) + b_up  (the caller adds x)."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, init: str):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        self.reset(init)

    @torch.no_grad()
    def reset(self, init: str) -> None:
        if init == "houlsby":  # Houlsby et al. 2019 Sec. 3.6: N(0, 0.01) truncated at two std
            for lin in (self.down, self.up):
                nn.init.trunc_normal_(lin.weight, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(lin.bias)
        else:
            bert_init(self.down, self.up)
        if init == "zero":
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class _Site(nn.Module):
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self.mixer: nn.Module | None = None
        self.active: list[str] | None = None  # None = all adapters
        self.route: list[str] | None = None   # multi-task: adapter of each task id (MT-A)
        self.task_ids: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.route is not None:
            return self._routed(x)
        names = [n for n in self.adapters if self.active is None or n in self.active]
        if not names:
            return None
        if self.mixer is not None:
            return self.mixer(x, [self.adapters[n] for n in names])
        out = self.adapters[names[0]](x)
        for n in names[1:]:
            out = out + self.adapters[n](x)
        return out


    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """Each example through the adapter of its task."""
        out = torch.zeros_like(x)
        for i, name in enumerate(self.route):
            rows = self.task_ids == i
            if rows.any():
                out[rows] = self.adapters[name](x[rows]).to(out.dtype)   # bf16 under autocast
        return out


class ProjSite(_Site):
    """h = proj(x); h + delta(h). Houlsby placement."""

    def forward(self, x):
        h = self.base(x)
        d = self.delta(h)
        return h if d is None else h + d


class NormSite(_Site):
    """s -> LN(s + delta(LN(s))). Pfeiffer placement (pretrained LN before and after)."""

    def forward(self, s):
        u = self.base(s)
        d = self.delta(u)
        return u if d is None else self.base(s + d)


SITE_CLASSES = {"proj": ProjSite, "norm": NormSite}


def site_paths(encoder: nn.Module, placement: str) -> list[tuple[str, str, str]]:
    """(key, module path, site kind) for every site of a placement, key like '3.ffn'."""
    arch = arch_of(encoder)
    layers = get_sub(encoder, arch.layers)
    out = []
    for i in range(len(layers)):
        for site, (field, kind) in PLACEMENTS[placement].items():
            out.append((f"{i}.{site}", f"{arch.layers}.{i}.{getattr(arch, field)}", kind))
    return out


def add_adapter(encoder: nn.Module, cfg: BottleneckConfig, name: str) -> list[BottleneckAdapter]:
    """Insert one adapter called `name` at every site of `cfg.placement`."""
    hidden = encoder.config.hidden_size
    bottleneck = max(1, int(hidden // cfg.reduction_factor))
    added = []
    for _, path, kind in site_paths(encoder, cfg.placement):
        site = get_sub(encoder, path)
        if not isinstance(site, _Site):
            site = SITE_CLASSES[kind](site)
            set_sub(encoder, path, site)
        elif not isinstance(site, SITE_CLASSES[kind]):
            raise UserError(f"{path} already holds adapters of another placement")
        if name in site.adapters:
            raise UserError(f"an adapter called '{name}' is already in the model")
        site.adapters[name] = BottleneckAdapter(hidden, bottleneck, cfg.activation, cfg.init)
        added.append(site.adapters[name])
    return added


def layer_norms(encoder: nn.Module) -> dict[str, nn.Module]:
    """'i.attn_norm' / 'i.ffn_norm' -> the LayerNorm (unwrapped from a NormSite)."""
    arch = arch_of(encoder)
    layers = get_sub(encoder, arch.layers)
    out = {}
    for i in range(len(layers)):
        for key, path in (("attn_norm", arch.attn_norm), ("ffn_norm", arch.ffn_norm)):
            mod = get_sub(layers[i], path)
            out[f"{i}.{key}"] = mod.base if isinstance(mod, _Site) else mod
    return out


def adapter_state(encoder: nn.Module, cfg: BottleneckConfig, name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights under name-free keys ('3.ffn.down.weight', '3.ffn_norm.bias')."""
    state = {}
    for key, path, _ in site_paths(encoder, cfg.placement):
        for pname, p in get_sub(encoder, path).adapters[name].state_dict().items():
            state[f"{key}.{pname}"] = p.detach().clone()
    if cfg.train_layer_norms:
        for key, ln in layer_norms(encoder).items():
            for pname, p in ln.state_dict().items():
                state[f"{key}.{pname}"] = p.detach().clone()
    return state


def load_adapter_state(encoder: nn.Module, cfg: BottleneckConfig, name: str, state: dict) -> None:
    """Inverse of `adapter_state`; missing or extra keys are errors."""
    state = dict(state)
    for key, path, _ in site_paths(encoder, cfg.placement):
        adapter = get_sub(encoder, path).adapters[name]
        _load_into(adapter, state, f"{key}.")
    if cfg.train_layer_norms:
        for key, ln in layer_norms(encoder).items():
            _load_into(ln, state, f"{key}.")
    if state:
        raise UserError(f"adapter weights hold {len(state)} unexpected tensors (e.g. '{next(iter(state))}'): "
                        f"the file does not match its adapter_config.json")


def _load_into(module: nn.Module, state: dict, prefix: str) -> None:
    own = module.state_dict()
    sub = {}
    for pname, ref in own.items():
        key = prefix + pname
        if key not in state:
            raise UserError(f"adapter weights lack '{key}': the file is incomplete or from another model")
        if state[key].shape != ref.shape:
            raise UserError(f"adapter weight '{key}' has shape {tuple(state[key].shape)}, the model "
                            f"needs {tuple(ref.shape)}: the adapter was trained for another model size")
        sub[pname] = state.pop(key)
    module.load_state_dict(sub)


def apply_bottleneck(encoder: nn.Module, cfg: BottleneckConfig, name: str) -> None:
    """Freeze the encoder, insert the adapter, unfreeze what the method trains."""
    cfg.check()
    encoder.requires_grad_(False)
    for adapter in add_adapter(encoder, cfg, name):
        adapter.requires_grad_(True)
    if cfg.train_layer_norms:
        for ln in layer_norms(encoder).values():
            ln.requires_grad_(True)


def preset_functions(placement: str):
    """The method interface (bottleneck, apply, trainable_state, load_state) of one placement,
    for a preset module whose Config holds the BottleneckConfig fields other than placement."""
    def bottleneck(cfg) -> BottleneckConfig:
        return BottleneckConfig(placement=placement, **asdict(cfg))

    def apply(encoder, cfg, names: list[str], sources=()) -> None:
        apply_bottleneck(encoder, bottleneck(cfg), names[0])

    def trainable_state(encoder, cfg, names: list[str]) -> dict:
        return adapter_state(encoder, bottleneck(cfg), names[0])

    def load_state(encoder, cfg, names: list[str], state: dict) -> None:
        load_adapter_state(encoder, bottleneck(cfg), names[0], state)

    return bottleneck, apply, trainable_state, load_state
