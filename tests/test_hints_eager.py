"""FitNet, CC, PKT and SP (eager hint losses) against their references: fp64 agreement, fp32 and bf16 against fp64,
odd shapes, N = 2, channels_last maps, lists of stages, argument errors and the modules' trainable state."""
import math

import pytest
import torch

from fastkd.hints.cc import CC, cc_loss, cc_loss_reference
from fastkd.hints.fitnet import ConvReg, FitNet, fitnet_loss, fitnet_loss_reference
from fastkd.hints.pkt import PKT, pkt_loss, pkt_loss_reference
from fastkd.hints.sp import SP, sp_loss, sp_loss_reference
from helpers import leaf, randn, rel_err

# name: (functional, reference, student stage shapes, teacher stage shapes, keyword arguments)
CASES = {
    "fitnet": (fitnet_loss, fitnet_loss_reference, [(2, 3, 5, 7)], [(2, 3, 5, 7)], {}),
    "fitnet-stages": (fitnet_loss, fitnet_loss_reference, [(3, 4, 3, 3), (3, 5)], [(3, 4, 3, 3), (3, 5)], {}),
    "cc-embedding": (cc_loss, cc_loss_reference, [(2, 9)], [(2, 9)], {}),
    "cc-embedding-stages": (cc_loss, cc_loss_reference, [(5, 9), (5, 3)], [(5, 9), (5, 3)], {}),
    "cc-taylor": (cc_loss, cc_loss_reference, [(5, 9)], [(5, 4)], dict(form="taylor")),
    "cc-taylor-p4": (cc_loss, cc_loss_reference, [(2, 3), (4, 6)], [(2, 7), (4, 6)],
                     dict(form="taylor", gamma=1.3, order=4)),
    "pkt": (pkt_loss, pkt_loss_reference, [(5, 9)], [(5, 4)], {}),
    "pkt-batchmean": (pkt_loss, pkt_loss_reference, [(2, 3), (6, 5)], [(2, 7), (6, 5)],
                      dict(reduction="batchmean", eps=1e-5)),
    "sp": (sp_loss, sp_loss_reference, [(2, 3, 5, 7)], [(2, 6, 3, 3)], {}),
    "sp-stages": (sp_loss, sp_loss_reference, [(4, 3, 5, 7), (4, 6), (4, 2, 9)], [(4, 2, 3, 3), (4, 5, 1, 3), (4, 6)],
                  {}),
    "sp-matrix": (sp_loss, sp_loss_reference, [(3, 3, 5, 7)], [(3, 6, 3, 3)], dict(normalize="matrix")),
}


def features(shapes, seed, dtype, channels_last=False):
    """Leaves of N(0, 1) + 0.5 values (a common offset, so the kernels' cosines are not all near 0)."""
    out = []
    for i, shape in enumerate(shapes):
        x = (randn(shape, seed + 10 * i) + 0.5).to(dtype)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(leaf(x))
    return out


def loss_and_grads(fn, s, t, **kw):
    loss = fn(s if len(s) > 1 else s[0], t if len(t) > 1 else t[0], **kw)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, s + t)]


def compare(name, dtype, loss_tol, grad_tol, channels_last=False):
    """The functional on `dtype` inputs against the reference on their exact fp64 values."""
    fn, ref, s_shapes, t_shapes, kw = CASES[name]
    s, t = features(s_shapes, 0, dtype, channels_last), features(t_shapes, 1, dtype, channels_last)
    loss, grads = loss_and_grads(fn, s, t, **kw)
    ref_loss, ref_grads = loss_and_grads(ref, [leaf(x.double()) for x in s], [leaf(x.double()) for x in t], **kw)
    assert loss.shape == () and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert float(ref_loss) > 1e-3  # the inputs make a loss well away from 0: a relative error means something
    assert rel_err(loss, ref_loss) <= loss_tol, (float(loss), float(ref_loss))
    for x, g, rg in zip(s + t, grads, ref_grads):
        assert g.dtype == dtype and g.shape == x.shape and torch.isfinite(g).all()
        assert float(rg.norm()) > 0 and rel_err(g, rg) <= grad_tol, rel_err(g, rg)


@pytest.mark.parametrize("name", CASES)
def test_fp64_matches_reference(name):
    compare(name, torch.float64, 1e-10, 1e-10)


@pytest.mark.parametrize("name", CASES)
def test_fp32_against_fp64(name):
    compare(name, torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize("name", CASES)
def test_bf16_against_fp64(name):
    compare(name, torch.bfloat16, 1e-2, 1e-2)


@pytest.mark.parametrize("name", ["fitnet", "fitnet-stages", "sp", "sp-stages", "sp-matrix"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channels_last(name, dtype):
    compare(name, dtype, 1e-5 if dtype == torch.float32 else 1e-10, 1e-5 if dtype == torch.float32 else 1e-10,
            channels_last=True)


def test_mixed_precision_pair_computes_in_fp64():
    s, t = randn((4, 6)), randn((4, 6), 1).float()
    assert cc_loss(s, t).dtype == torch.float64 and fitnet_loss(s, t).dtype == torch.float64


def test_hand_computed_values():
    """Small cases worked out by hand from the papers' formulas."""
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    t = torch.zeros(3, 2, dtype=torch.float64)
    assert float(fitnet_loss(s, t)) == pytest.approx((1 + 4 + 9) / 6)
    # delta = s: <d0, d1> = 0, <d1, d2> = 0; shift the third row so that <d1, d2> = 2 * 5
    assert float(cc_loss(s, t)) == 0.0
    assert float(cc_loss(s + torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 5.0]]), t)) == pytest.approx(10 / 2)
    # SP: orthogonal student rows, G_s = diag(1, 4) -> I; parallel teacher rows, G_t = [[2, 4], [4, 8]] -> both
    # rows [1, 2] / sqrt(5)
    parallel = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    r5 = math.sqrt(5)
    assert float(sp_loss(s[:2], parallel)) == pytest.approx(((1 - 1 / r5) ** 2 + 4 / 5 + 1 / 5 + (1 - 2 / r5) ** 2) / 4)
    # CC Taylor, P = 1: K_ij = exp(-2g)(1 + 2g cos_ij); orthogonal student vs parallel teacher differ off the diagonal
    g = 0.4
    cc = float(cc_loss(s[:2], parallel, form="taylor", order=1))
    assert cc == pytest.approx(2 * (math.exp(-2 * g) * 2 * g) ** 2 / 4)


def test_identical_features_give_zero():
    x = randn((4, 3, 5, 5))
    flat = x.flatten(1)
    assert float(fitnet_loss(x, x)) == 0.0 and float(sp_loss(x, x)) == 0.0
    assert float(cc_loss(flat, flat)) == 0.0 and float(cc_loss(flat, flat, form="taylor")) == 0.0
    assert abs(float(pkt_loss(flat, flat))) < 1e-15


def test_scale_invariances():
    """SP normalises the Gram matrix (row by row or as a whole): a global scale of the features changes nothing;
    PKT normalises each feature row: a positive per-sample scale changes nothing (with eps = 0)."""
    s, t = randn((5, 3, 3, 2)), randn((5, 7), 1)
    for normalize in ("row", "matrix"):
        assert float(sp_loss(3.7 * s, t, normalize=normalize)) == pytest.approx(
            float(sp_loss(s, t, normalize=normalize)), rel=1e-12)
    scale = torch.tensor([0.5, 2.0, 3.0, 1.0, 7.0], dtype=torch.float64)[:, None]
    s = s.flatten(1)
    assert float(pkt_loss(s * scale, t, eps=0.0)) == pytest.approx(float(pkt_loss(s, t, eps=0.0)), rel=1e-12)
    assert float(pkt_loss(s * scale, t)) != float(pkt_loss(s, t))  # eps breaks it: the test can see a scale


def test_pkt_zeroes_nan_rows_as_the_authors_code():
    """A NaN feature row is zeroed after normalisation, exactly like an all-zero row; an all-zero row has a finite
    gradient."""
    s, t = randn((4, 6)), randn((4, 3), 1)
    nan_row, zero_row = s.clone(), s.clone()
    nan_row[2, 1], zero_row[2] = float("nan"), 0.0
    assert float(pkt_loss(nan_row, t)) == float(pkt_loss(zero_row, t))
    assert float(pkt_loss_reference(nan_row, t)) == pytest.approx(float(pkt_loss(zero_row, t)), rel=1e-12)
    s = leaf(zero_row)
    pkt_loss(s, t).backward()
    assert torch.isfinite(s.grad).all()  # the code's sqrt(sum f^2) would give NaN here (see pkt.py)


# ---------------------------------------------------------------------------------------------- argument errors
FNS = [fitnet_loss, fitnet_loss_reference, cc_loss, cc_loss_reference, pkt_loss, pkt_loss_reference, sp_loss,
       sp_loss_reference]


@pytest.mark.parametrize("fn", FNS)
def test_common_argument_errors(fn):
    x = randn((3, 4))
    with pytest.raises(TypeError, match="f_s must be a torch.Tensor"):
        fn([x.tolist()], [x])
    with pytest.raises(TypeError, match="f_t must be float16"):
        fn(x, x.long())
    with pytest.raises(ValueError, match="same batch size"):
        fn(x, randn((2, 4)))
    with pytest.raises(ValueError, match="f_s must have shape"):
        fn(randn((3,)), x)
    with pytest.raises(ValueError, match="must not be empty"):
        fn(randn((3, 0)), x)
    with pytest.raises(TypeError, match="both be tensors or both be lists"):
        fn([x], x)
    with pytest.raises(ValueError, match="same non-zero number of stages"):
        fn([x, x], [x])


@pytest.mark.parametrize("fn", [fitnet_loss, fitnet_loss_reference])
def test_fitnet_errors(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(randn((2, 3, 4, 4)), randn((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="same shape"):
        fn(randn((2, 3, 4, 4)), randn((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        fn(randn((2, 48)), randn((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="f_s must have shape"):
        fn(randn((2, 3, 4, 4, 1)), randn((2, 3, 4, 4, 1)))


@pytest.mark.parametrize("fn", [cc_loss, cc_loss_reference])
def test_cc_errors(fn):
    x = randn((3, 4))
    with pytest.raises(ValueError, match="f_s must have shape"):
        fn(randn((3, 4, 1, 1)), x)
    with pytest.raises(ValueError, match="match in dim 1"):
        fn(x, randn((3, 5)))
    with pytest.raises(ValueError, match="N >= 2"):
        fn(randn((1, 4)), randn((1, 4)))
    with pytest.raises(ValueError, match="form must be one of"):
        fn(x, x, form="rbf")
    with pytest.raises(ValueError, match="gamma must be finite"):
        fn(x, x, form="taylor", gamma=0.0)
    with pytest.raises(TypeError, match="gamma must be a real number"):
        fn(x, x, form="taylor", gamma="0.4")
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        fn(x, x, form="taylor", order=0)
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        fn(x, x, form="taylor", order=2.0)


@pytest.mark.parametrize("fn", [pkt_loss, pkt_loss_reference])
def test_pkt_errors(fn):
    x = randn((3, 4))
    with pytest.raises(ValueError, match="f_t must have shape"):
        fn(x, randn((3, 4, 1, 1)))
    with pytest.raises(ValueError, match="eps must be finite"):
        fn(x, x, eps=-1e-7)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fn(x, x, reduction="sum")


@pytest.mark.parametrize("fn", [sp_loss, sp_loss_reference])
def test_sp_errors(fn):
    with pytest.raises(ValueError, match="f_s must have shape"):
        fn(randn((3, 4, 1, 1, 1)), randn((3, 4)))
    with pytest.raises(ValueError, match="normalize must be one of"):
        fn(randn((3, 4)), randn((3, 4)), normalize="frobenius")


def test_module_argument_errors():
    with pytest.raises(ValueError, match="ConvReg cannot map"):
        ConvReg((2, 4, 3, 3), (2, 4, 5, 5))
    with pytest.raises(ValueError, match="ConvReg cannot map"):
        ConvReg((2, 4, 8, 3), (2, 4, 4, 4))  # Hs = 2 Ht but the widths do not follow
    with pytest.raises(ValueError, match="s_shape must be a feature-map shape"):
        FitNet((2, 4, 8), (2, 4, 8))
    with pytest.raises(TypeError, match="both be shapes or both be lists"):
        FitNet([(2, 4, 8, 8)], (2, 4, 8, 8))
    with pytest.raises(ValueError, match="same non-zero number of stages"):
        FitNet([(2, 4, 8, 8)], [(2, 4, 8, 8), (2, 4, 8, 8)])
    fitnet = FitNet((2, 4, 8, 8), (2, 6, 4, 4))
    with pytest.raises(ValueError, match="f_s must have the 4 channels"):
        fitnet(randn((2, 5, 8, 8)).float(), randn((2, 6, 4, 4)).float())
    with pytest.raises(ValueError, match="f_s must list 1 stages"):
        fitnet([randn((2, 4, 8, 8))] * 2, [randn((2, 6, 4, 4))] * 2)
    with pytest.raises(ValueError, match="both be given"):
        CC(8, None)
    with pytest.raises(ValueError, match="form must be one of"):
        CC(form="rbf")
    with pytest.raises(ValueError, match="reduction must be one of"):
        PKT(reduction="sum")
    with pytest.raises(ValueError, match="normalize must be one of"):
        SP(normalize="col")
    for make in (lambda w: FitNet((2, 4, 8, 8), (2, 4, 8, 8), weight=w), lambda w: CC(weight=w),
                 lambda w: PKT(weight=w), lambda w: SP(weight=w)):
        with pytest.raises(ValueError, match="weight must be finite"):
            make(-1.0)
        with pytest.raises(TypeError, match="weight must be a real number"):
            make(None)


# ------------------------------------------------------------------------------------------------------ modules
@pytest.mark.parametrize("s_hw, t_hw", [((8, 8), (4, 4)), ((3, 5), (6, 10)), ((7, 5), (4, 3)), ((5, 5), (5, 5))])
def test_fitnet_module_regresses_and_trains(s_hw, t_hw):
    """Each ConvReg case maps onto the teacher's shape; the loss is fitnet_loss of the regressed map; the
    regressor's parameters (conv and BN) get gradients."""
    torch.manual_seed(0)
    module = FitNet((2, 4, *s_hw), (2, 6, *t_hw))
    f_s, f_t = leaf(randn((3, 4, *s_hw)).float()), randn((3, 6, *t_hw), 1).float()
    loss = module(f_s, f_t)
    reg = module.regressors[0]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, 100 * fitnet_loss(torch.relu(reg.bn(reg.conv(f_s))), f_t))  # mdistiller's weight
    loss.backward()
    assert f_s.grad is not None and float(f_s.grad.norm()) > 0
    for p in module.parameters():
        assert p.grad is not None and float(p.grad.norm()) > 0


def test_fitnet_module_stages_and_use_relu():
    torch.manual_seed(0)
    shapes = [(2, 4, 8, 8), (2, 8, 4, 4)], [(2, 6, 4, 4), (2, 3, 4, 4)]
    f_s = [randn((2, *s[1:]), i).float() for i, s in enumerate(shapes[0])]
    f_t = [randn((2, *t[1:]), 5 + i).float() for i, t in enumerate(shapes[1])]
    relu, linear = FitNet(*shapes, weight=1.0), FitNet(*shapes, use_relu=False, weight=2.5)
    linear.load_state_dict(relu.state_dict())
    mapped = [r.bn(r.conv(s)) for r, s in zip(relu.regressors, f_s)]
    torch.testing.assert_close(linear(f_s, f_t), 2.5 * fitnet_loss(mapped, f_t))
    torch.testing.assert_close(relu(f_s, f_t), fitnet_loss([m.relu() for m in mapped], f_t))


@pytest.mark.parametrize("form", ["embedding", "taylor"])
def test_cc_module_embeds_and_trains(form):
    torch.manual_seed(0)
    module = CC(12, 20, feat_dim=8, form=form, gamma=0.5, order=3)
    f_s, f_t = leaf(randn((5, 3, 2, 2)).float()), randn((5, 20), 1).float()
    loss = module(f_s, f_t)
    expected = 0.02 * cc_loss(module.embed_s[1](f_s.flatten(1)), module.embed_t[1](f_t), form=form, gamma=0.5,
                              order=3)  # RepDistiller's weight
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for p in module.parameters():
        assert p.grad is not None and float(p.grad.norm()) > 0
    assert list(CC().parameters()) == []
    x = f_s.detach().flatten(1)
    torch.testing.assert_close(CC(weight=1.0)(x, x.flip(0)), cc_loss(x, x.flip(0)))


def test_stateless_modules_match_functionals():
    s, t = randn((4, 5)), randn((4, 3), 1)
    assert float(PKT()(s, t)) == float(30000 * pkt_loss(s, t))  # the authors' weights
    assert float(PKT(1e-3, "batchmean", weight=2.0)(s, t)) == float(2 * pkt_loss(s, t, eps=1e-3, reduction="batchmean"))
    assert float(SP()(s, t)) == float(3000 * sp_loss(s, t))
    assert float(SP("matrix", weight=1.0)([s, t], [t, s])) == float(sp_loss([s, t], [t, s], normalize="matrix"))
    assert list(PKT().parameters()) == [] and list(SP().parameters()) == []
