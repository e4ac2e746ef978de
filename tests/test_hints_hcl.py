"""ReviewKD's HCL: the fused kernels against the fp64 eager reference (ReviewKD's hcl), with the pooled window means
saved or recomputed, gradcheck on the kernels, edge cases, argument errors, and the allocations of the fused path."""
import pytest
import torch

import fastkd
from fastkd.hints import hcl as hcl_module
from fastkd.hints.hcl import HCL, hcl_loss, hcl_loss_reference
from fastkd.kernels.hcl import saves_pooled
from fastkd.traffic import OpLog
from helpers import check_compiled_matches_eager, check_hint_loss, leaf, randn, rel_err


def fused(*args):
    with fastkd.use_backend("triton"):
        return hcl_loss(*args)


def check(f_s, f_t, loss_tol=1e-5, grad_tol=1e-5, **kwargs):
    return check_hint_loss(hcl_loss, hcl_loss_reference, f_s, f_t, loss_tol, grad_tol, **kwargs)


CASES = {
    # name: (shape, pooled means saved)
    "all_levels_7x7_overlapping_windows": ((2, 3, 7, 7), True),
    "all_levels_5x3_recomputed": ((2, 3, 5, 3), False),  # 21 means per channel outweigh a 5 x 3 plane
    "levels_2_1_on_4x4": ((2, 3, 4, 4), True),
    "levels_2_1_on_3x3": ((2, 5, 3, 3), True),
    "level_1_on_2x5": ((2, 3, 2, 5), True),
    "no_level_on_1x1": ((2, 6, 1, 1), False),  # ReviewKD's pooled last stage: the MSE alone
    "W_below_the_level_8x2": ((2, 3, 8, 2), False),  # 4 x 4 pooling of 2 columns: windows repeat columns
    "row_and_column_blocks_40x80": ((2, 2, 40, 80), True),  # 2 blocks of rows and of columns per plane
}


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    shape, saved = CASES[name]
    s, t = randn(shape, 1).float(), randn(shape, 2).float()
    assert saves_pooled(s, t) == saved
    check(s, t)


def test_channels_last_and_sliced():
    s = randn((2, 20, 9, 6), 1).float().to(memory_format=torch.channels_last)
    t = randn((2, 20, 9, 12), 2).float()[..., ::2]  # strided columns
    check(s, t)
    x = leaf(s)
    (gx,) = torch.autograd.grad(fused(x, t), x)
    assert gx.stride() == s.stride()  # the gradient keeps the input's memory format


def test_student_only_gradient_and_mixed_dtypes():
    s, t = leaf(randn((2, 3, 6, 6), 1).float()), randn((2, 3, 6, 6), 2).bfloat16()
    loss = fused(s, t)
    (g,) = torch.autograd.grad(loss, s)
    s64 = leaf(s.double())
    ref = hcl_loss_reference(s64, t.double())
    (rg,) = torch.autograd.grad(ref, s64)
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5 and rel_err(g, rg) <= 1e-5


def test_review_kd_stages():
    """ReviewKD's CIFAR shapes, scaled down: maps of 8, 4 and 1 (the pooled feature), summed."""
    s = [randn((2, 4, 8, 8), 1).float(), randn((2, 8, 4, 4), 3).float(), randn((2, 8, 1, 1), 5).float()]
    t = [randn((2, 4, 8, 8), 2).float(), randn((2, 8, 4, 4), 4).float(), randn((2, 8, 1, 1), 6).float()]
    loss, _ = check(s, t)
    assert torch.allclose(loss, sum(fused(a, b) for a, b in zip(s, t)), rtol=1e-6)


def test_bf16():
    check(randn((2, 5, 9, 13), 1).bfloat16(), randn((2, 5, 9, 13), 2).bfloat16(), loss_tol=1e-2, grad_tol=1e-2)


@pytest.mark.parametrize("shape", [(2, 2, 5, 5), (2, 2, 5, 3), (2, 3, 1, 1)], ids=["saved", "recomputed", "mse"])
def test_gradcheck_fp64(shape):
    """fp64 on the real kernels, teacher grad too (fast mode: a random projection of the Jacobian; full one below)."""
    s, t = leaf(randn(shape, 1)), leaf(randn(shape, 2))
    assert saves_pooled(s, t) == (shape == (2, 2, 5, 5))
    assert torch.autograd.gradcheck(fused, (s, t), fast_mode=True)


def test_gradcheck_fp64_full_jacobian():
    s, t = leaf(randn((2, 1, 3, 3), 1)), leaf(randn((2, 1, 3, 3), 2))  # levels 2 and 1, means saved
    assert saves_pooled(s, t)
    assert torch.autograd.gradcheck(fused, (s, t))


def test_identical_maps_give_zero():
    s = randn((2, 3, 6, 6), 1).float()
    x = leaf(s)
    loss = fused(x, s.clone())
    (g,) = torch.autograd.grad(loss, x)
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(g) == 0


def test_module_and_dispatch():
    s, t = randn((2, 3, 5, 5), 1).float(), randn((2, 3, 5, 5), 2).float()
    assert HCL().weight == 1.0
    with fastkd.use_backend("triton"):
        assert torch.allclose(HCL(weight=2.0)(s, t), 2.0 * hcl_loss(s, t))
    with fastkd.use_backend("reference"):
        assert torch.equal(hcl_loss(s, t), hcl_loss_reference(s, t))


@pytest.mark.parametrize("f_s, f_t, error, match", [
    (randn((2, 3, 5)), randn((2, 3, 5)), ValueError, "f_s must have shape"),
    (randn((2, 3, 4, 4)), randn((2, 4, 4, 4)), ValueError, "match in dim 1"),
    (randn((2, 3, 4, 4)), randn((2, 3, 4, 5)), ValueError, "match in dim 3"),
    (randn((2, 3, 4, 4)), randn((3, 3, 4, 4)), ValueError, "same batch size"),
    ([randn((2, 3, 4, 4))], [], ValueError, "same non-zero number of stages"),
    ("features", randn((2, 3, 4, 4)), TypeError, "both be tensors or both be lists"),
])
def test_argument_errors(f_s, f_t, error, match):
    with pytest.raises(error, match=match):
        fused(f_s, f_t)


@pytest.mark.interpreter
def test_no_temporary_as_large_as_an_input_and_no_host_sync():
    """32 x 32 maps: besides the two gradients, nothing of an input's size (the saved means are [N, C, 21] fp32, the
    partial losses [N, C / BLOCK_C]); the eager reference makes several.  Every allocation is proportional to N C,
    as the inputs are, so N = 2, C = 16 stands for a ResNet stage's N = 64, C = 256 (run once outside the suite:
    the same allocations, 64 * 16 times larger)."""
    s, t = leaf(randn((2, 16, 32, 32), 1).bfloat16()), leaf(randn((2, 16, 32, 32), 2).bfloat16())
    size = s.numel() * s.element_size()
    with fastkd.use_backend("triton"), OpLog() as log:
        grads = torch.autograd.grad(hcl_loss(s, t), (s, t))
    big = [(name, x.shape) for name, outs in log.ops for x in outs if x.numel() * x.element_size() >= size]
    assert [shape for _, shape in big] == [g.shape for g in grads], big
    assert log.host_syncs() == []
    with OpLog() as eager:
        torch.autograd.grad(hcl_loss_reference(s, t), (s, t))
    assert len([1 for _, outs in eager.ops for x in outs if x.numel() * x.element_size() >= size]) >= 4


def test_torch_compile_fullgraph_and_opcheck():
    """The custom ops' fake implementations and autograd: a fullgraph-compiled loss and backward (AOTAutograd) equal
    eager, and torch.library.opcheck passes on both ops, means saved or not (fp64)."""
    s, t = randn((2, 3, 6, 6), 1), randn((2, 3, 6, 6), 2)
    check_compiled_matches_eager(hcl_loss, s, t)
    g = torch.tensor(1.5, dtype=torch.float64)
    for s, t in ((s, t), (randn((2, 3, 5, 3), 1), randn((2, 3, 5, 3), 2))):
        _, pooled = hcl_module.hcl_stage(s, t)
        torch.library.opcheck(hcl_module.hcl_stage, (leaf(s), leaf(t)))
        torch.library.opcheck(hcl_module.hcl_stage_backward, (g, s, t, pooled, True, True))
