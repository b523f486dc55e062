"""bf16 autocast computed as fp32 GEMMs of bf16-rounded operands (`precision.Bf16ByFp32`, what a
CPU without native bf16 runs) gives PyTorch's own bf16 results: the same dtypes, the same values
on products small enough that the accumulation order cannot differ, the same gradients."""

import pytest
import torch
import torch.nn.functional as F

from adapterbench.recipe.precision import PRODUCTS, autocast
from tests.conftest import tiny_batch
from tests.test_methods import build


def both_ways(fn, *args):
    """fn(*args) under bf16 autocast with PyTorch's kernels and with the fp32-GEMM emulation."""
    out = []
    for emulate in (False, True):
        with autocast("bf16", "cpu", emulate=emulate):
            out.append(fn(*args))
    return out


def exact(fn, *args):
    """The bf16 product as a bf16 kernel means it: bf16 operands, exact sum, one rounding."""
    return fn(*[a.to(torch.bfloat16).double() for a in args]).to(torch.bfloat16)


PRODUCT_CASES = {
    "linear": (F.linear, [(4, 16, 32), (24, 32), (24,)]),
    "matmul": (torch.matmul, [(4, 16, 32), (4, 32, 8)]),
    "@": (lambda a, b: a @ b, [(4, 16, 32), (4, 32, 8)]),
    "bmm": (torch.bmm, [(4, 16, 32), (4, 32, 8)]),
    "baddbmm": (torch.baddbmm, [(4, 16, 8), (4, 16, 32), (4, 32, 8)]),
    "addmm": (torch.addmm, [(16, 8), (16, 32), (32, 8)]),
    "mm": (torch.mm, [(16, 32), (32, 8)]),
}


@pytest.mark.parametrize("name", sorted(PRODUCT_CASES))
def test_each_product_equals_pytorchs_bf16_result_bit_for_bit(name):
    fn, shapes = PRODUCT_CASES[name]
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=gen) for s in shapes]
    native, emulated = both_ways(fn, *args)
    assert native.dtype == emulated.dtype == torch.bfloat16
    assert torch.equal(native, emulated) and torch.equal(emulated, exact(fn, *args))
    plain = fn(*args).to(torch.bfloat16)          # fp32 rounded once at the end: what the test tells apart
    assert (plain != emulated).float().mean() > 0.2


def test_products_outside_autocast_and_other_ops_are_untouched():
    gen = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)
    with autocast("fp32", "cpu", emulate=True):
        assert F.linear(x, w).dtype == torch.float32 and torch.equal(F.linear(x, w), x @ w.T)
    native, emulated = both_ways(lambda t: (F.gelu(t), F.layer_norm(t, (16,)), t.softmax(-1)), x)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(native, emulated))
    assert F.scaled_dot_product_attention not in PRODUCTS       # PyTorch's bf16 attention, as autocast runs it


def test_one_context_object_emulates_at_every_with():
    """bench builds the context once and enters it for every step: each `with` emulates, and
    nothing stays emulated (or autocast) outside it."""
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 16, generator=gen), torch.randn(4, 16, generator=gen)
    ctx = autocast("bf16", "cpu", emulate=True)
    for _ in range(3):
        with ctx:
            assert torch.equal(F.linear(x, w), exact(F.linear, x, w))
        assert F.linear(x, w).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def test_gradients_round_where_pytorchs_bf16_backward_rounds():
    gen = torch.Generator().manual_seed(2)
    x0, w0, b0 = torch.randn(6, 32, generator=gen), torch.randn(12, 32, generator=gen), torch.randn(12, generator=gen)
    grads = []
    for emulate in (False, True):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with autocast("bf16", "cpu", emulate=emulate):
            y = F.linear(torch.tanh(x), w, b)
        (y.float() ** 2).sum().backward()
        grads.append([t.grad for t in (x, w, b)])
    for native, emulated in zip(*grads):
        assert native.dtype == emulated.dtype == torch.float32
        assert torch.equal(native, emulated)


@pytest.mark.parametrize("method", ["pfeiffer", "houlsby", "fusion", "camtl", "full"])
def test_a_task_model_trains_the_same_either_way(method):
    """A tiny model with each method's modules, in train mode: every module's output has the
    same dtype both ways, and loss and gradients agree far below bf16's resolution (measured:
    equal bit for bit but CA-MTL's gradients, 7e-5 apart)."""
    results = []
    for emulate in (False, True):
        model, _, _, names = build(method, "bert")
        model.train()
        dtypes = []
        for m in model.modules():
            m.register_forward_hook(lambda mod, i, o: dtypes.append(o.dtype) if torch.is_tensor(o) else None)
        batch = tiny_batch(seed=3, batch=6, length=12)
        torch.manual_seed(4)                                   # the same dropout masks both ways
        with autocast("bf16", "cpu", emulate=emulate):
            out = model(**batch, task_ids=torch.arange(6) % len(names))
        loss = sum(logits.float().pow(2).mean() for _, logits in out.values())
        loss.backward()
        results.append((dtypes, loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])))
    (d0, l0, g0), (d1, l1, g1) = results
    assert d0 == d1 and torch.bfloat16 in d0
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert ((g1 - g0).norm() / g0.norm()) < 1e-4       # (fp32 is 4e-3 to 1.2e-2 away from either)
