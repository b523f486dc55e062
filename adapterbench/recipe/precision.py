"""train.precision: fp32, or bf16 autocast (weights stay fp32), on any machine at its speed.

bf16 autocast rounds the operands of each matrix product (linear, matmul, bmm, baddbmm, addmm,
attention) to bf16, accumulates in fp32 and rounds the result to bf16; the other operations
follow autocast's lists. GPUs and CPUs with AVX512-BF16 or AMX do this in hardware. On other
CPUs PyTorch's bf16 GEMMs are slow (measured 24x slower than fp32 on an AVX2-only EPYC, one
thread), so there each product but attention is computed as an fp32 GEMM of the bf16-rounded
operands, its result rounded to bf16 (`Bf16ByFp32`): the same rounding points, bit for bit
PyTorch's bf16 result on small products; on large ones the order of the fp32 accumulation
differs, as it does between any two bf16 kernels. Attention keeps PyTorch's bf16 kernel, which
also rounds inside (its probabilities), so it is left exactly as autocast runs it. The run's
metrics.json says which way its products ran (`bf16_matmul`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from adapterbench.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")

# The matrix products CPU autocast runs in bf16, as Python sees them (nn.Linear calls F.linear;
# `a @ b` is Tensor.__matmul__), but attention (see above). Convolutions and RNNs are not used
# by the encoders here.
PRODUCTS = frozenset({
    F.linear,
    torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
    torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm,
})


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX); asked
    once per process (`autocast` is built for every training step)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if not any(checks):      # a torch without these probes: no claim either way, so PyTorch's kernels
        return True
    return any(bool(check()) for check in checks if check)


def uses_bf16(precision: str, device) -> bool:
    """auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = bf16 autocast on either; fp32 = none."""
    if precision not in PRECISIONS:
        raise UserError(f"train.precision '{precision}' must be one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def bf16_matmul(precision: str, device) -> str | None:
    """How a run's bf16 matrix products are computed on this machine, for its metrics.json:
    "native" (GPU, AVX512-BF16, AMX), "fp32 GEMM of bf16-rounded operands" (other CPUs), or None
    for an fp32 run."""
    if not uses_bf16(precision, device):
        return None
    emulated = torch.device(device).type == "cpu" and not native_bf16_cpu()
    return "fp32 GEMM of bf16-rounded operands" if emulated else "native"


def autocast(precision: str, device, emulate: bool | None = None) -> Autocast:
    """The context a forward pass runs in (reusable: `with` it as often as needed). `emulate`:
    compute bf16 products as `Bf16ByFp32` does; None = where this CPU has no native bf16."""
    device = torch.device(device)
    on = uses_bf16(precision, device)
    if emulate is None:
        emulate = bf16_matmul(precision, device) == "fp32 GEMM of bf16-rounded operands"
    return Autocast(torch.autocast(device.type, dtype=torch.bfloat16, enabled=on), on and emulate)


class Autocast:
    """torch.autocast, and `Bf16ByFp32` inside it when `emulate`; entered anew by each `with`."""

    def __init__(self, ctx: torch.autocast, emulate: bool):
        self.ctx, self.emulate, self.stack = ctx, emulate, []

    def __enter__(self):
        self.ctx.__enter__()
        self.stack.append(Bf16ByFp32() if self.emulate else None)
        if self.stack[-1] is not None:
            self.stack[-1].__enter__()
        return self

    def __exit__(self, *exc):
        mode = self.stack.pop()
        if mode is not None:
            mode.__exit__(*exc)
        return self.ctx.__exit__(*exc)


def _bf16_rounded(x):
    if torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(torch.bfloat16).float()
    return x


class Bf16ByFp32(TorchFunctionMode):
    """Under bf16 autocast: each of `PRODUCTS` as an fp32 product of its bf16-rounded operands,
    the result rounded to bf16, as a bf16 kernel with fp32 accumulation gives it. Gradients round
    at the same points (the casts' backward), so the backward pass matches too. Every other
    operation passes through to autocast unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = func(*[_bf16_rounded(a) for a in args], **{k: _bf16_rounded(v) for k, v in kwargs.items()})
        return out.to(torch.bfloat16) if out.dtype == torch.float32 else out


def accelerate_setting_ignored(precision: str, device) -> str | None:
    """One warning line when `accelerate launch --mixed_precision X` or a saved `accelerate config`
    (both arrive as ACCELERATE_MIXED_PRECISION) asks for another precision than the run's own
    `train.precision`: the run's wins (its identity names it), the setting is ignored."""
    import os
    wanted = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if not wanted:
        return None
    ours = "bf16" if uses_bf16(precision, device) else "no"
    if wanted == ours:
        return None
    return (f"warning: ACCELERATE_MIXED_PRECISION={wanted} (accelerate launch --mixed_precision / accelerate "
            f"config) is ignored: this run trains as its train.precision={precision} says ({'bf16 autocast' if ours == 'bf16' else 'fp32'}); "
            f"set train.precision to change it (a different run, in its own folder)")
