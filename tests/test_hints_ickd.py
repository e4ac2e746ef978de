"""ICKD-C: the fused kernels against the fp64 eager reference (the authors' ICKDLoss), with the backward's coupling
matrix stored or recomputed, gradcheck on the kernels, edge cases, argument errors, the module's embedding, and the
allocations of the fused path."""
import pytest
import torch

import fastkd
from fastkd.hints import ickd as ickd_module
from fastkd.hints.ickd import ICKD, ickd_loss, ickd_loss_reference
from fastkd.kernels.ickd import stores_coupling
from fastkd.traffic import OpLog
from helpers import check_compiled_matches_eager, check_hint_loss, leaf, randn


def fused(*args, **kwargs):
    with fastkd.use_backend("triton"):
        return ickd_loss(*args, **kwargs)


def check(f_s, f_t, loss_tol=1e-5, grad_tol=1e-5, **kwargs):
    return check_hint_loss(ickd_loss, ickd_loss_reference, f_s, f_t, loss_tol, grad_tol, **kwargs)


CASES = {
    # name: (shape, coupling stored (C <= L for fp32), keyword arguments)
    "stored_odd_sizes": ((2, 5, 3, 3), True, {}),
    "stored_two_row_blocks": ((2, 70, 9, 9), True, {}),  # C = 70 > 64 rows per block, L = 81: 3 dot steps
    "recomputed": ((2, 40, 3, 3), False, {}),
    "recomputed_two_row_blocks": ((2, 70, 5, 3), False, {}),
    "divisor_c_n_n": ((2, 6, 4, 5), True, {"divisor": "C*N*N"}),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    shape, stored, kwargs = CASES[name]
    s, t = randn(shape, 1).float(), randn(shape, 2).float()
    assert stores_coupling(s, t) == stored
    check(s, t, **kwargs)


def test_channels_last_and_sliced():
    s = randn((2, 12, 5, 5), 1).float().to(memory_format=torch.channels_last)
    t = randn((2, 24, 5, 5), 2).float()[:, ::2]  # non-contiguous channels
    check(s, t)
    x = leaf(s)
    (gx,) = torch.autograd.grad(fused(x, t), x)
    assert gx.stride() == s.stride()  # the gradient keeps the input's memory format


def test_zero_channel():
    """A channel that is 0 everywhere: its Gram row is 0 (F.normalize's eps branch) and so is its column."""
    s, t = randn((2, 6, 4, 4), 1).float(), randn((2, 6, 4, 4), 2).float()
    s[:, 2] = 0.0
    t[0, 4] = 0.0
    check(s, t)


def test_stages_sum():
    s = [randn((2, 4, 4, 4), 1).float(), randn((2, 8, 2, 2), 3).float()]
    t = [randn((2, 4, 4, 4), 2).float(), randn((2, 8, 2, 2), 4).float()]
    loss, _ = check(s, t)
    assert torch.allclose(loss, fused(s[0], t[0]) + fused(s[1], t[1]), rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 16, 6, 6), (2, 48, 3, 3)], ids=["stored", "recomputed"])
def test_bf16(shape):
    s, t = randn(shape, 1).bfloat16(), randn(shape, 2).bfloat16()
    assert stores_coupling(s, t) == (shape[1] == 16)
    check(s, t, loss_tol=1e-2, grad_tol=1e-2)


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 5, 2, 2)], ids=["stored", "recomputed"])
def test_gradcheck_fp64(shape):
    """fp64 on the real kernels, teacher grad too (fast mode: a random projection of the Jacobian; full one below)."""
    s, t = leaf(randn(shape, 1)), leaf(randn(shape, 2))
    assert stores_coupling(s, t) == (shape[1] == 3)
    assert torch.autograd.gradcheck(fused, (s, t), fast_mode=True)


def test_gradcheck_fp64_full_jacobian():
    s, t = leaf(randn((2, 2, 1, 2), 1)), leaf(randn((2, 2, 1, 2), 2))  # coupling stored
    assert stores_coupling(s, t)
    assert torch.autograd.gradcheck(fused, (s, t))


def test_module_embeds_the_student():
    torch.manual_seed(0)
    module = ICKD(3, 5)
    assert (module.weight, module.divisor) == (2.5, "C*N")
    conv, bn = module.embed
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (3, 5, (1, 1), None)
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 5
    s, t = randn((2, 3, 4, 4), 1).float(), randn((2, 5, 4, 4), 2).float()
    with fastkd.use_backend("triton"):
        loss = module(s, t)
    assert torch.allclose(loss, 2.5 * ickd_loss_reference(module.embed(s), t), rtol=1e-5)
    loss.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    with fastkd.use_backend("reference"):
        assert torch.equal(ickd_loss(s[:, :2], t[:, :2]), ickd_loss_reference(s[:, :2], t[:, :2]))


@pytest.mark.parametrize("f_s, f_t, kwargs, error, match", [
    (randn((2, 3, 4)), randn((2, 3, 4)), {}, ValueError, "f_s must have shape"),
    (randn((2, 3, 4, 4)), randn((2, 5, 4, 4)), {}, ValueError, "match in dim 1"),
    (randn((2, 3, 4, 4)), randn((2, 3, 2, 8)), {}, ValueError, "match in dim 2"),
    (randn((2, 3, 4, 4)), randn((1, 3, 4, 4)), {}, ValueError, "same batch size"),
    (randn((2, 3, 4, 4)), randn((2, 3, 4, 4)), {"divisor": "N"}, ValueError, "divisor must be"),
    (randn((2, 3, 4, 4)).int(), randn((2, 3, 4, 4)), {}, TypeError, "f_s must be float"),
])
def test_argument_errors(f_s, f_t, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused(f_s, f_t, **kwargs)


@pytest.mark.interpreter
def test_no_temporary_as_large_as_an_input_and_no_host_sync():
    """bf16 maps with a ResNet stage's ratio of channels to positions (C = L / 4: 256 over 32 x 32, here 64 over
    16 x 16, N = 2; every allocation is proportional to N and scales with C / L as the inputs do): besides the two
    gradients, the stored coupling matrices [N, C, C] fp32 (half an input each here) and small per-row vectors;
    the eager reference makes several [N, C, C] and the autograd of bmm more."""
    s, t = leaf(randn((2, 64, 16, 16), 1).bfloat16()), leaf(randn((2, 64, 16, 16), 2).bfloat16())
    size = s.numel() * s.element_size()
    assert stores_coupling(s, t)
    with fastkd.use_backend("triton"), OpLog() as log:
        grads = torch.autograd.grad(ickd_loss(s, t), (s, t))
    fresh = [(name, x.numel() * x.element_size(), x.shape) for name, outs in log.ops for x in outs]
    assert sorted(n for _, n, _ in fresh if n >= size) == [g.numel() * g.element_size() for g in grads], fresh
    assert sorted(n for _, n, shape in fresh if shape == (2, 64, 64)) == [size // 2] * 2
    assert log.host_syncs() == []
    with OpLog() as eager:
        torch.autograd.grad(ickd_loss_reference(s, t), (s, t))
    assert len([1 for _, outs in eager.ops for x in outs if x.numel() * x.element_size() >= size // 2]) >= 6


def test_torch_compile_fullgraph_and_opcheck():
    """The custom ops' fake implementations and autograd: a fullgraph-compiled loss and backward (AOTAutograd) equal
    eager, and torch.library.opcheck passes on both ops, coupling stored or not (fp64)."""
    s, t = randn((2, 3, 3, 3), 1), randn((2, 3, 3, 3), 2)
    check_compiled_matches_eager(ickd_loss, s, t)
    g = torch.tensor(1.5, dtype=torch.float64)
    for s, t in ((s, t), (randn((2, 5, 2, 2), 1), randn((2, 5, 2, 2), 2))):
        _, coef = ickd_module.ickd_stage(s, t, 0.1)
        torch.library.opcheck(ickd_module.ickd_stage, (leaf(s), leaf(t), 0.1))
        torch.library.opcheck(ickd_module.ickd_stage_backward, (g, s, t, coef, 0.1, True, True))
