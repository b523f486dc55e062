"""One matrix over every method and architecture: identity at initialisation, exactly the
right parameters trainable, save -> load gives identical logits."""

import pytest
import torch

from adapterbench.methods import METHODS, method_config
from adapterbench.methods.bottleneck import BottleneckAdapter, NormSite, ProjSite
from adapterbench.models import ClassificationHead, HeadConfig, TaskModel

from .conftest import ARCHS, tiny_batch, tiny_encoder

# Methods that train on one model; fusion needs source adapters and has its own tests.
SINGLE = sorted(m for m in METHODS if METHODS[m].KIND not in ("fusion", "multitask"))


def apply(method_name: str, arch: str, **extra):
    enc = tiny_encoder(arch)
    mod = METHODS[method_name]
    cfg = method_config({"name": method_name, **extra})
    mod.apply(enc, cfg, "t")
    return enc, mod, cfg


def hidden(enc, batch):
    with torch.no_grad():
        return enc(**batch).last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SINGLE)
def test_identity_at_init_with_zero_up_projection(method, arch):
    batch = tiny_batch()
    ref = hidden(tiny_encoder(arch), batch)
    extra = {"init": "zero"} if METHODS[method].KIND == "adapter" else {}
    enc, _, _ = apply(method, arch, **extra)
    enc.eval()
    assert torch.equal(hidden(enc, batch), ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_default_init_changes_outputs(method, arch):
    """The adapters are really in the forward pass (non-zero init moves the outputs)."""
    batch = tiny_batch()
    ref = hidden(tiny_encoder(arch), batch)
    enc, _, _ = apply(method, arch, init="bert")
    enc.eval()
    assert not torch.allclose(hidden(enc, batch), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters(arch):
    layers = 2
    d, m = 32, 2  # hidden 32, reduction factor 16
    per_adapter = 2 * d * m + d + m
    enc, _, _ = apply("pfeiffer", arch)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.t." in n for n in trainable)
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == layers * per_adapter

    enc, _, _ = apply("houlsby", arch)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    norms = {n for n in trainable if ".adapters." not in n}
    assert len(trainable - norms) == layers * 2 * 4          # 2 adapters x (2 weights + 2 biases)
    assert norms and all("norm" in n.lower() for n in norms)
    assert len(norms) == layers * 2 * 2                       # 2 LayerNorms x (weight, bias)
    assert sum(isinstance(m_, ProjSite) for m_ in enc.modules()) == layers * 2

    enc, _, _ = apply("full", arch)
    assert all(p.requires_grad for p in enc.parameters())
    enc, _, _ = apply("head", arch)
    assert not any(p.requires_grad for p in enc.parameters())


def test_pfeiffer_wraps_ffn_layer_norm_once_per_layer():
    enc, _, _ = apply("pfeiffer", "bert")
    sites = [m for m in enc.modules() if isinstance(m, NormSite)]
    assert len(sites) == 2 and all(isinstance(s.base, torch.nn.LayerNorm) for s in sites)
    assert isinstance(enc.encoder.layer[0].output.LayerNorm, NormSite)


def test_pfeiffer_matches_adapterhub_formula():
    """out = LN(s + up(relu(down(LN(s))))) with s = FFN output + residual (seq_bn config)."""
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(32)
    site = NormSite(ln)
    site.adapters["a"] = BottleneckAdapter(32, 4, "relu", "bert")
    s = torch.randn(2, 5, 32)
    a = site.adapters["a"]
    expected = ln(s + a.up(torch.relu(a.down(ln(s)))))
    assert torch.allclose(site(s), expected)


def test_houlsby_init_is_truncated_normal():
    a = BottleneckAdapter(384, 24, "swish", "houlsby")
    for lin in (a.down, a.up):
        assert lin.weight.abs().max() <= 2e-2 + 1e-9
        assert 0.5e-2 < lin.weight.std() < 1.5e-2
        assert torch.count_nonzero(lin.bias) == 0


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", SINGLE)
def test_save_load_identical_logits(method, arch, tmp_path):
    from adapterbench.runs import load_tensors, save_tensors
    enc, mod, cfg = apply(method, arch)
    head = ClassificationHead(HeadConfig(32, 3))
    model = TaskModel(enc, head).eval()
    perturb(model)
    batch = tiny_batch(2)
    with torch.no_grad():
        want = model(**batch)
    save_tensors(tmp_path / "w.safetensors", mod.trainable_state(enc, cfg, "t") or {"none": torch.zeros(1)})
    save_tensors(tmp_path / "h.safetensors", head.state_dict())

    enc2, _, _ = apply(method, arch)
    state = load_tensors(tmp_path / "w.safetensors")
    state.pop("none", None)
    mod.load_state(enc2, cfg, "t", state)
    head2 = ClassificationHead(HeadConfig(32, 3))
    head2.load_state_dict(load_tensors(tmp_path / "h.safetensors"))
    model2 = TaskModel(enc2, head2).eval()
    with torch.no_grad():
        got = model2(**batch)
    assert torch.equal(got, want)


def test_adapter_state_keys_are_name_free():
    enc, mod, cfg = apply("houlsby", "bert")
    keys = set(mod.trainable_state(enc, cfg, "t"))
    assert "0.attn.down.weight" in keys and "1.ffn.up.bias" in keys and "0.attn_norm.weight" in keys
    assert not any(".t." in k for k in keys)


def test_load_rejects_adapter_of_other_size():
    from adapterbench.errors import UserError
    enc, mod, cfg = apply("pfeiffer", "bert")
    other_cfg = method_config({"name": "pfeiffer", "reduction_factor": 8})
    enc2 = tiny_encoder("bert")
    mod.apply(enc2, other_cfg, "t")
    with pytest.raises(UserError, match="shape"):
        mod.load_state(enc2, other_cfg, "t", mod.trainable_state(enc, cfg, "t"))
