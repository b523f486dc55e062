"""One matrix over every registered method (fusion and the multi-task methods included) and
every architecture: the method contract, identity at initialisation where the method promises
it, exactly the right parameters trainable, save -> load gives identical logits, and resume
after a crash gives identical weights."""

from dataclasses import asdict

import pytest
import torch

from adapterbench.recipe.artifacts import Source
from adapterbench.methods import METHODS, Method, get_method, method_config
from adapterbench.methods.bottleneck import BottleneckAdapter, NormSite, ProjSite
from adapterbench.models import ClassificationHead, HeadConfig, TaskModel

from .conftest import ARCHS, tiny_batch, tiny_encoder

# the settings under which a method promises to leave the base model unchanged at step 0
IDENTITY = {n: m.IDENTITY_AT_INIT for n, m in METHODS.items() if m.IDENTITY_AT_INIT is not None}
EXTRA = {"camtl": {"max_length": 16}}
MULTI = sorted(n for n, m in METHODS.items() if m.STAGE == "multitask")
NEEDS_ARCH = {"camtl": ("bert", "roberta", "xlm-roberta", "electra", "mpnet")}  # its attention-mask hook


def fusion_sources(arch: str) -> list[Source]:
    """Two Pfeiffer adapters with random weights, as artifacts.load_sources returns them."""
    pf = get_method("pfeiffer")
    cfg = method_config({"name": "pfeiffer"})
    out = []
    for i in range(2):
        enc = tiny_encoder(arch)
        torch.manual_seed(10 + i)
        pf.apply(enc, cfg, [f"s{i}"])
        meta = {"method": asdict(cfg), "model_type": enc.config.model_type, "hidden_size": 32,
                "base_model": "tiny", "num_layers": 2, "task": f"s{i}"}
        out.append(Source(f"/nowhere/s{i}", f"s{i}", meta, pf.trainable_state(enc, cfg, [f"s{i}"])))
    return out


def build(method_name: str, arch: str, seed: int = 0, **extra):
    """(TaskModel, method, cfg, names) as a run builds it, on a tiny encoder."""
    mod = get_method(method_name)
    cfg = method_config({"name": method_name, **EXTRA.get(method_name, {}), **extra})
    names = ["t0", "t1"] if method_name in MULTI else ["t0"]
    enc = tiny_encoder(arch)
    torch.manual_seed(seed)
    mod.apply(enc, cfg, names, fusion_sources(arch) if method_name == "fusion" else ())
    heads = {n: ClassificationHead(HeadConfig(32, 3)) for n in names}
    return TaskModel(enc, heads, getattr(mod, "set_tasks", None)), mod, cfg, names


def cases(methods):
    return [(m, a) for m in methods for a in ARCHS if a in NEEDS_ARCH.get(m, ARCHS)]


def logits(model, names, batch):
    ids = torch.arange(batch["input_ids"].shape[0]) % len(names)
    with torch.no_grad():
        out = model(**batch, task_ids=ids)
    return torch.cat([out[i][1] for i in sorted(out)])


def test_every_method_satisfies_the_contract():
    for name, mod in METHODS.items():
        assert isinstance(mod, Method), name
        assert mod.STAGE in ("extract", "finetune", "fuse", "multitask"), name
        assert mod.Config().name == name
        assert mod.SUPPORTS <= {"fusion_source", "merge", "init_from", "export:adapterhub", "export:peft", "bench"}


@pytest.mark.parametrize("method,arch", cases(IDENTITY))
def test_identity_at_init(method, arch):
    batch = tiny_batch()
    with torch.no_grad():
        ref = tiny_encoder(arch)(**batch).last_hidden_state
    model, mod, _, names = build(method, arch, **IDENTITY[method])
    model.eval()
    if hasattr(mod, "set_tasks"):
        mod.set_tasks(model.encoder, torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        got = model.encoder(**batch).last_hidden_state
    assert torch.equal(got, ref) or (method == "camtl" and torch.allclose(got, ref, atol=1e-6))
    # and the inserted modules are really in the forward pass: moving them moves the output
    perturb(model.encoder)
    with torch.no_grad():
        moved = model.encoder(**batch).last_hidden_state
    assert not torch.allclose(moved, ref, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
def test_default_init_changes_outputs(method, arch):
    """The adapters are really in the forward pass (non-zero init moves the outputs)."""
    batch = tiny_batch()
    with torch.no_grad():
        ref = tiny_encoder(arch)(**batch).last_hidden_state
    model, _, _, _ = build(method, arch, init="bert")
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model.encoder(**batch).last_hidden_state, ref)


def trainable_of(method: str, arch: str) -> set[str]:
    model, _, _, _ = build(method, arch)
    return {n for n, p in model.encoder.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,arch", cases(METHODS))
def test_exactly_the_right_parameters_train(method, arch):
    model, _, cfg, names = build(method, arch)
    enc = model.encoder
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    everything = {n for n, _ in enc.named_parameters()}
    assert all(p.requires_grad for p in model.heads.parameters())
    layers, d = 2, 32
    if method == "pfeiffer":
        assert trainable and all(".adapters.t0." in n for n in trainable)
        assert sum(p.numel() for n, p in enc.named_parameters() if n in trainable) == layers * (2 * d * 2 + d + 2)
    elif method == "houlsby":
        norms = {n for n in trainable if ".adapters." not in n}
        assert len(trainable - norms) == layers * 2 * 4 and len(norms) == layers * 2 * 2
        assert all("norm" in n.lower() for n in norms)
        assert sum(isinstance(m_, ProjSite) for m_ in enc.modules()) == layers * 2
    elif method in ("full", "mtl"):
        assert trainable == everything
    elif method == "head":
        assert not trainable
    elif method == "fusion":
        assert trainable and all(".mixer." in n for n in trainable)
        assert not any(".adapters." in n for n in trainable)
    elif method == "mt-a":
        assert trainable == everything
        assert all(any(f".adapters.{t}." in n for n in trainable) for t in names)
    elif method == "camtl":
        lower = {n for n in trainable if ".layer.0." in n}
        assert not lower, lower                              # the frozen half's own weights
        assert not any(n.startswith("embeddings.") for n in trainable)
        assert {"camtl_context.embedding.weight", "camtl_align.map.weight"} <= trainable
        # as the reference's freeze_encoder_layers: a frozen layer's conditional attention still trains
        assert {"camtl_attention.0.weight", "camtl_attention.0.film.map.weight", "camtl_attention.1.weight"} <= trainable
    else:   # any other method: what trains is what it saves
        mod = get_method(method)
        saved = sum(v.numel() for v in mod.trainable_state(enc, cfg, names).values())
        assert trainable and sum(p.numel() for n, p in enc.named_parameters() if n in trainable) == saved


def perturb(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method,arch", cases(METHODS))
def test_save_load_identical_logits(method, arch, tmp_path):
    from adapterbench.fileio import load_tensors, save_tensors
    model, mod, cfg, names = build(method, arch)
    model.eval()
    perturb(model)
    batch = tiny_batch(2)
    want = logits(model, names, batch)
    save_tensors(tmp_path / "w.safetensors", mod.trainable_state(model.encoder, cfg, names) or {"none": torch.zeros(1)})
    for n in names:
        save_tensors(tmp_path / f"h-{n}.safetensors", model.heads[n].state_dict())

    model2, _, _, _ = build(method, arch, seed=5)     # other random init: everything must come from the files
    state = load_tensors(tmp_path / "w.safetensors")
    state.pop("none", None)
    mod.load_state(model2.encoder, cfg, names, state)
    for n in names:
        model2.heads[n].load_state_dict(load_tensors(tmp_path / f"h-{n}.safetensors"))
    model2.eval()
    assert torch.equal(logits(model2, names, batch), want)


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_after_a_crash_gives_identical_weights(method, tmp_path):
    """Train 6 steps uninterrupted; then crash after step 3 (checkpoints every 2 steps) and run
    again: the resumed run ends with the same weights, bit for bit."""
    from adapterbench.config import TrainConfig
    from adapterbench.data import Collator
    from adapterbench.recipe.sampling import Shuffled, TaskMixture
    from adapterbench.tasks import TaskSpec
    from adapterbench.recipe.train import train
    g = torch.Generator().manual_seed(0)
    items = [[{"input_ids": torch.randint(5, 30, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist(),
               "labels": float(j % 3), "task_id": t, "uid": j} for j in range(12)] for t in range(2)]
    for x in items:
        for it in x:
            it["attention_mask"] = [1] * len(it["input_ids"])
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, eval_batch_size=8, checkpoint_every=2, log_every=1)

    def go(folder, crash_at=None):
        torch.manual_seed(0)
        model, _, _, names = build(method, "bert")
        tasks = [TaskSpec(name=n, labels=["a", "b", "c"]) for n in names]
        source = (TaskMixture(items, 4, 0, "uniform") if len(names) > 1 else Shuffled(items[0], 4, 0))

        def log(record):
            if crash_at and record.get("step") == crash_at and "loss" in record:
                raise Crash
        train(model, source, [x[:6] for x in items[:len(names)]], tasks, Collator(0), cfg, log, False, folder,
              heldout_sets=[x[6:] for x in items[:len(names)]])
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    want = go(tmp_path / "a")
    with pytest.raises(Crash):
        go(tmp_path / "b", crash_at=5)
    got = go(tmp_path / "b")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_pfeiffer_wraps_ffn_layer_norm_once_per_layer():
    model, _, _, _ = build("pfeiffer", "bert")
    sites = [m for m in model.encoder.modules() if isinstance(m, NormSite)]
    assert len(sites) == 2 and all(isinstance(s.base, torch.nn.LayerNorm) for s in sites)
    assert isinstance(model.encoder.encoder.layer[0].output.LayerNorm, NormSite)


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


def test_adapter_state_keys_are_name_free():
    model, mod, cfg, names = build("houlsby", "bert")
    keys = set(mod.trainable_state(model.encoder, cfg, names))
    assert "0.attn.down.weight" in keys and "1.ffn.up.bias" in keys and "0.attn_norm.weight" in keys
    assert not any(".t0." in k for k in keys)


def test_load_rejects_adapter_of_other_size():
    from adapterbench.errors import UserError
    model, mod, cfg, names = build("pfeiffer", "bert")
    other, _, other_cfg, _ = build("pfeiffer", "bert", reduction_factor=8)
    with pytest.raises(UserError, match="shape"):
        mod.load_state(other.encoder, other_cfg, names, mod.trainable_state(model.encoder, cfg, names))


def test_camtl_frozen_conditional_parts_freeze_with_their_layer_on_request():
    """method.frozen_conditional_trains=false: the frozen layers' conditional attention is frozen
    too (this package's behaviour before it followed the reference); the upper layers' trains."""
    from adapterbench.methods import camtl
    enc = tiny_encoder("bert")
    camtl.apply(enc, camtl.Config(frozen_conditional_trains=False), ["a", "b"])
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert "camtl_attention.1.weight" in trainable and "camtl_attention.0.weight" not in trainable
    enc = tiny_encoder("bert")
    camtl.apply(enc, camtl.Config(freeze_layers=2), ["a", "b"])      # every layer frozen, as `0-1`
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    inside = {n for n in trainable if ".layer." in n}
    assert inside and all(".adapters.camtl." in n for n in inside)   # of the layers' own parts, the top adapter
    assert {"camtl_attention.0.weight", "camtl_attention.1.weight"} <= trainable
