"""Attention transfer: the fused kernels against the fp64 eager reference (mdistiller's formula; Eq. 2 of the paper
for mode="paper"), gradcheck on the kernels, edge cases, argument errors, and the allocations of the fused path."""
import pytest
import torch

import fastkd
from fastkd.hints import at as at_module
from fastkd.hints.at import AT, at_loss, at_loss_reference
from fastkd.traffic import OpLog
from helpers import check_compiled_matches_eager, check_hint_loss, leaf, randn, rel_err


def fused(*args, **kwargs):
    with fastkd.use_backend("triton"):
        return at_loss(*args, **kwargs)


def check(f_s, f_t, loss_tol=1e-5, grad_tol=1e-5, **kwargs):
    return check_hint_loss(at_loss, at_loss_reference, f_s, f_t, loss_tol, grad_tol, **kwargs)


CASES = {
    # name: (student shape, teacher shape, keyword arguments)
    "odd_size_channels_differ": ((2, 3, 5, 5), (2, 6, 5, 5), {}),
    "two_blocks_of_positions_and_channels": ((2, 40, 12, 12), (2, 5, 12, 12), {}),  # L = 144 > 128, C = 40 > 32
    "student_pooled_7_to_3": ((2, 4, 7, 7), (2, 3, 3, 3), {}),  # overlapping adaptive-pool windows
    "teacher_pooled_non_square": ((2, 4, 3, 5), (2, 3, 6, 10), {}),
    "paper": ((2, 3, 5, 5), (2, 4, 5, 5), {"mode": "paper"}),
    "odd_power": ((2, 3, 4, 4), (2, 2, 4, 4), {"p": 3.0}),
    "even_power": ((2, 3, 4, 4), (2, 2, 4, 4), {"p": 4.0}),
    "paper_p1": ((2, 3, 4, 4), (2, 2, 4, 4), {"p": 1.0, "mode": "paper"}),
    "paper_real_power": ((2, 3, 4, 4), (2, 2, 4, 4), {"p": 2.5, "mode": "paper"}),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    s_shape, t_shape, kwargs = CASES[name]
    check(randn(s_shape, 1).float(), randn(t_shape, 2).float(), **kwargs)


def test_real_power_of_positive_maps():
    """p = 2.5 in the code's f^p: real powers of post-ReLU maps (f >= 0)."""
    check(randn((2, 3, 5, 5), 1).abs().float(), randn((2, 2, 5, 5), 2).abs().float(), p=2.5)


def test_real_power_of_a_negative_value_is_nan_as_in_torch():
    s = randn((2, 3, 4, 4), 1).float()
    loss = fused(s, randn((2, 3, 4, 4), 2).float(), p=2.5)
    assert torch.isnan(loss) and torch.isnan(at_loss_reference(s, randn((2, 3, 4, 4), 2).float(), p=2.5))


def test_channels_last_and_sliced_channels():
    s = randn((2, 8, 6, 6), 1).float().to(memory_format=torch.channels_last)
    t = randn((2, 6, 6, 6), 2).float()[:, ::2]  # non-contiguous channels
    check(s, t)
    x = leaf(s)
    (gx,) = torch.autograd.grad(fused(x, t), x)
    assert gx.stride() == s.stride()  # the gradient keeps the input's memory format


def test_zero_attention_map():
    """A sample whose student map is 0 everywhere: F.normalize's eps branch (a = q / eps), in both modes."""
    s = randn((2, 3, 4, 4), 1).float()
    s[0] = 0.0
    t = randn((2, 3, 4, 4), 2).float()
    check(s, t)
    check(s, t, mode="paper")


def test_stages_sum():
    s = [randn((2, 3, 8, 8), 1).float(), randn((2, 5, 4, 4), 3).float()]
    t = [randn((2, 4, 8, 8), 2).float(), randn((2, 6, 2, 2), 4).float()]
    loss, _ = check(s, t)
    assert torch.allclose(loss, fused(s[0], t[0]) + fused(s[1], t[1]), rtol=1e-6)


def test_mixed_dtypes():
    """An fp32 student against a bf16 teacher (fp32 loss), and against an fp64 teacher (fp64 loss)."""
    s = leaf(randn((2, 3, 6, 6), 1).float())
    for t, dtype in ((randn((2, 4, 3, 3), 2).bfloat16(), torch.float32), (randn((2, 4, 3, 3), 2), torch.float64)):
        loss = fused(s, t)
        (g,) = torch.autograd.grad(loss, s)
        s64 = leaf(s.double())
        ref = at_loss_reference(s64, t.double())
        (rg,) = torch.autograd.grad(ref, s64)
        assert loss.dtype == dtype and rel_err(loss.detach(), ref.detach()) <= 1e-5 and rel_err(g, rg) <= 1e-5


def test_bf16():
    check(randn((2, 6, 7, 7), 1).bfloat16(), randn((2, 4, 7, 7), 2).bfloat16(), loss_tol=1e-2, grad_tol=1e-2)


@pytest.mark.parametrize("kwargs", [{}, {"p": 3.0}, {"p": 1.5, "mode": "paper"}], ids=["code", "odd", "paper"])
def test_gradcheck_fp64(kwargs):
    """Both kernels' backward (map and distance), fp64 on the real kernels, teacher grad too (fast mode: a random
    projection of the Jacobian; the full Jacobian below)."""
    s, t = leaf(randn((2, 2, 3, 3), 1)), leaf(randn((2, 3, 3, 3), 2))
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, **kwargs), (s, t), fast_mode=True)


def test_gradcheck_fp64_full_jacobian():
    s, t = leaf(randn((2, 1, 2, 2), 1)), leaf(randn((2, 2, 2, 2), 2))
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b, p=3.0), (s, t))


def test_module_and_dispatch():
    s, t = randn((2, 3, 5, 5), 1).float(), randn((2, 4, 5, 5), 2).float()
    module = AT()
    assert (module.p, module.mode, module.weight) == (2.0, "code", 1000.0)
    with fastkd.use_backend("triton"):
        assert torch.allclose(module(s, t), 1000.0 * at_loss(s, t))
    with fastkd.use_backend("reference"):
        assert torch.equal(AT(p=3.0, mode="paper", weight=2.0)(s, t), 2.0 * at_loss_reference(s, t, p=3.0,
                                                                                               mode="paper"))


@pytest.mark.parametrize("f_s, f_t, kwargs, error, match", [
    (randn((2, 3, 5)), randn((2, 3, 5, 5)), {}, ValueError, "f_s must have shape"),
    (randn((2, 3, 8, 4)), randn((2, 3, 4, 8)), {}, ValueError, "spatial sizes"),
    (randn((2, 3, 4, 4)), randn((3, 3, 4, 4)), {}, ValueError, "same batch size"),
    (randn((2, 3, 4, 4)), torch.ones(2, 3, 4, 4, dtype=torch.int64), {}, TypeError, "f_t must be float"),
    (randn((2, 3, 4, 4)), randn((2, 3, 4, 4)), {"p": 0.0}, ValueError, "p must be"),
    (randn((2, 3, 4, 4)), randn((2, 3, 4, 4)), {"p": float("nan")}, ValueError, "p must be"),
    (randn((2, 3, 4, 4)), randn((2, 3, 4, 4)), {"mode": "exact"}, ValueError, "mode must be"),
    ([randn((2, 3, 4, 4))], [randn((2, 3, 4, 4))] * 2, {}, ValueError, "same non-zero number of stages"),
    ([randn((2, 3, 4, 4))], randn((2, 3, 4, 4)), {}, TypeError, "both be tensors or both be lists"),
])
def test_argument_errors(f_s, f_t, kwargs, error, match):
    with pytest.raises(error, match=match):
        fused(f_s, f_t, **kwargs)


@pytest.mark.interpreter
def test_no_temporary_as_large_as_an_input_and_no_host_sync():
    """A ResNet stage's C and H W (256, 32 x 32; N = 2: the allocations are those of N = 64 scaled by N/64): besides
    the two gradients, nothing of an input's size; the eager reference allocates several such tensors."""
    s = leaf(randn((2, 256, 32, 32), 1).bfloat16())
    t = leaf(randn((2, 128, 32, 32), 2).bfloat16())
    smallest = min(x.numel() * x.element_size() for x in (s, t))
    with fastkd.use_backend("triton"), OpLog() as log:
        grads = torch.autograd.grad(at_loss(s, t), (s, t))
    fresh = [(name, x) for name, outs in log.ops for x in outs]
    big = [(name, x.numel(), x.dtype) for name, x in fresh if x.numel() * x.element_size() >= smallest]
    assert sorted((n, str(d)) for _, n, d in big) == sorted((g.numel(), str(g.dtype)) for g in grads), big
    assert log.host_syncs() == []
    with OpLog() as eager:
        torch.autograd.grad(at_loss_reference(s, t), (s, t))
    assert len([1 for _, outs in eager.ops for x in outs if x.numel() * x.element_size() >= smallest]) >= 4



def test_torch_compile_fullgraph_and_opcheck():
    """The custom ops' fake implementations and autograd: a fullgraph-compiled loss and backward (AOTAutograd) equal
    eager, and torch.library.opcheck passes on every op (fp64)."""
    s, t = randn((2, 3, 6, 6), 1), randn((2, 4, 3, 3), 2)
    check_compiled_matches_eager(lambda a, b: at_loss(a, b, p=3.0), s, t)
    t = randn((2, 4, 6, 6), 2)
    q_s, q_t = at_module.at_map(s, 3.0, "odd", 1 / 3), at_module.at_map(t, 3.0, "odd", 1 / 4)
    _, stats = at_module.at_distance(q_s, q_t, 1e-12, 0.05, False)
    for op, args in [
        (at_module.at_map, (leaf(s.to(memory_format=torch.channels_last)), 3.0, "odd", 1 / 3)),
        (at_module.at_map_backward, (torch.rand_like(q_s), s, 3.0, "odd", 1 / 3)),
        (at_module.at_distance, (leaf(q_s), leaf(q_t), 1e-12, 0.05, True)),
        (at_module.at_distance_backward, (torch.rand(2, dtype=s.dtype), q_s, q_t, stats, 1e-12, 0.05, False, True,
                                          True)),
    ]:
        torch.library.opcheck(op, args)
