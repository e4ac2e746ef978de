"""The public API: argument checks, backend dispatch, backend agreement, modules, output shapes and dtypes."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd import backend, ops
from helpers import leaf, loss_and_grads, rel_err


def logits(shape, dtype=torch.float32, scale=2.0, device="cpu", seed=0):
    """Drawn on the CPU (the same values on every device), then moved to `device`."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64, device="cpu")).to(dtype).to(device)


def pair(shape=(3, 10), dtype=torch.float32, device="cpu"):
    return logits(shape, dtype, device=device), logits(shape, dtype, device=device, seed=1)


# Every loss entry point, called as f(s, t, **kwargs): functional and module forms.
LOSS_CALLS = {
    "kl_div": lambda s, t, **kw: fastkd.kl_div(s, t, **kw),
    "jsd": lambda s, t, **kw: fastkd.jsd(s, t, **kw),
    "KLDiv": lambda s, t, temperature=1.0, labels=None, **kw: fastkd.KLDiv(temp=temperature, **kw)(s, t, labels=labels),
    "JSD": lambda s, t, temperature=1.0, labels=None, **kw: fastkd.JSD(temp=temperature, **kw)(s, t, labels=labels),
}
SOFTMAX_CALLS = {"softmax": fastkd.softmax, "log_softmax": fastkd.log_softmax}


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    """Every test starts from the default backend ('auto'), whatever the calling shell set."""
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert backend._override is None


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSS_CALLS)
def test_shape_mismatch(name, device):
    s, t = logits((3, 10), device=device), logits((3, 11), device=device)
    msg = r"student_logits and teacher_logits must have the same shape, got \(3, 10\) and \(3, 11\)"
    with pytest.raises(ValueError, match=msg):
        LOSS_CALLS[name](s, t)
    with pytest.raises(ValueError, match="same shape"):
        LOSS_CALLS[name](logits((2, 3, 10), device=device), logits((6, 10), device=device))


@pytest.mark.parametrize("name", LOSS_CALLS)
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_bad_logits_in_losses(name, which, device):
    call = LOSS_CALLS[name]
    good = logits((3, 10), device=device)

    def with_bad(bad):
        return call(bad, good) if which == "student_logits" else call(good, bad)

    with pytest.raises(TypeError, match=rf"{which} must be float16, bfloat16, float32 or float64.*int64"):
        with_bad(torch.ones(3, 10, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match=rf"{which} must be float16.*torch.bool"):
        with_bad(torch.ones(3, 10, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor, got list"):
        with_bad(good.tolist())
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor, got ndarray"):
        with_bad(good.cpu().numpy())


@pytest.mark.parametrize("name", LOSS_CALLS)
def test_degenerate_shapes_in_losses(name, device):
    call = LOSS_CALLS[name]
    zero_d = torch.tensor(1.0, device=device)
    with pytest.raises(ValueError, match=r"student_logits must have shape \[\.\.\., V\] with V >= 1, got \(\)"):
        call(zero_d, zero_d.clone())
    empty_v = torch.zeros(3, 0, device=device)
    with pytest.raises(ValueError, match=r"student_logits must have shape \[\.\.\., V\] with V >= 1, got \(3, 0\)"):
        call(empty_v, empty_v.clone())
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \[\.\.\., V\] with V >= 1, got \(3, 0\)"):
        call(logits((3, 10), device=device), empty_v)
    with pytest.raises(ValueError, match=r"teacher_logits must have shape \[\.\.\., V\].*\(\)"):
        call(logits((3, 10), device=device), zero_d)


@pytest.mark.parametrize("name", SOFTMAX_CALLS)
def test_bad_input_in_softmax(name, device):
    fn = SOFTMAX_CALLS[name]
    with pytest.raises(TypeError, match=r"x must be float16, bfloat16, float32 or float64 logits, got torch.int32"):
        fn(torch.ones(3, 4, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        fn([[1.0, 2.0]])
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got float"):
        fn(1.0)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., V\] with V >= 1, got \(\)"):
        fn(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., V\] with V >= 1, got \(2, 0\)"):
        fn(torch.zeros(2, 0, device=device))


@pytest.mark.parametrize("name", LOSS_CALLS)
def test_devices_differ(name):
    s, t = logits((3, 10)), logits((3, 10), seed=1).to("meta")
    msg = r"student_logits and teacher_logits must be on the same device, got cpu and meta"
    with pytest.raises(ValueError, match=msg):
        LOSS_CALLS[name](s, t)
    with pytest.raises(ValueError, match=r"same device, got meta and cpu"):
        LOSS_CALLS[name](t, s)


BAD_TEMPERATURES = [
    (0.0, ValueError, r"temperature must be finite and in \(0\.0, inf\], got 0\.0"),
    (0, ValueError, r"temperature must be finite and in \(0\.0, inf\], got 0\.0"),
    (-1.0, ValueError, r"temperature must be finite.*got -1\.0"),
    (math.inf, ValueError, r"temperature must be finite.*got inf"),
    (-math.inf, ValueError, r"temperature must be finite.*got -inf"),
    (math.nan, ValueError, r"temperature must be finite.*got nan"),
    (True, TypeError, r"temperature must be a real number, got bool"),
    ("2.0", TypeError, r"temperature must be a real number, got str"),
    (None, TypeError, r"temperature must be a real number, got NoneType"),
]


@pytest.mark.parametrize("value,exc,msg", BAD_TEMPERATURES, ids=[repr(v[0]) for v in BAD_TEMPERATURES])
@pytest.mark.parametrize("name", list(LOSS_CALLS) + list(SOFTMAX_CALLS))
def test_bad_temperature(name, value, exc, msg, device):
    s, t = pair(device=device)
    with pytest.raises(exc, match=msg):
        if name in SOFTMAX_CALLS:
            SOFTMAX_CALLS[name](s, value)
        else:
            LOSS_CALLS[name](s, t, temperature=value)


def test_temperature_positional_and_numeric_types(device):
    """Temperature may be positional and any real number type (int, numpy float)."""
    s, t = pair(device=device)
    expected = fastkd.kl_div(s, t, 2.0)
    assert torch.equal(fastkd.kl_div(s, t, 2), expected)
    assert torch.equal(fastkd.kl_div(s, t, np.float32(2.0)), expected)
    assert torch.equal(fastkd.softmax(s, 2), fastkd.softmax(s, temperature=2.0))


BAD_BETAS = [
    (-0.1, ValueError, r"beta must be finite and in \[0\.0, 1\.0\], got -0\.1"),
    (1.1, ValueError, r"beta must be finite and in \[0\.0, 1\.0\], got 1\.1"),
    (math.nan, ValueError, r"beta must be finite and in \[0\.0, 1\.0\], got nan"),
    (math.inf, ValueError, r"beta must be finite.*got inf"),
    (True, TypeError, r"beta must be a real number, got bool"),
    ("0.5", TypeError, r"beta must be a real number, got str"),
]


@pytest.mark.parametrize("value,exc,msg", BAD_BETAS, ids=[repr(v[0]) for v in BAD_BETAS])
@pytest.mark.parametrize("name", ["jsd", "JSD"])
def test_bad_beta(name, value, exc, msg, device):
    s, t = pair(device=device)
    with pytest.raises(exc, match=msg):
        LOSS_CALLS[name](s, t, beta=value)


@pytest.mark.parametrize("name", LOSS_CALLS)
def test_reduction_mean_is_refused_with_the_reason(name, device):
    s, t = pair(device=device)
    with pytest.raises(ValueError, match=r"reduction='mean' is refused.*not a divergence.*use 'batchmean'"):
        LOSS_CALLS[name](s, t, reduction="mean")


@pytest.mark.parametrize("name", LOSS_CALLS)
@pytest.mark.parametrize("value", ["avg", "Sum", "", None, "elementwise_mean"])
def test_unknown_reduction(name, value, device):
    s, t = pair(device=device)
    msg = r"reduction must be one of \('batchmean', 'sum', 'none'\), got " + re.escape(repr(value))
    with pytest.raises(ValueError, match=msg):
        LOSS_CALLS[name](s, t, reduction=value)


@pytest.mark.parametrize("name", LOSS_CALLS)
def test_bad_labels(name, device):
    call = LOSS_CALLS[name]
    s, t = pair((2, 3, 10), device=device)
    with pytest.raises(ValueError, match=r"labels must have the leading shape of the logits \(2, 3\), got \(6,\)"):
        call(s, t, labels=torch.zeros(6, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"labels must have the leading shape.*got \(2, 3, 10\)"):
        call(s, t, labels=torch.zeros(2, 3, 10, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got torch.float32"):
        call(s, t, labels=torch.zeros(2, 3, device=device))
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got torch.bool"):
        call(s, t, labels=torch.zeros(2, 3, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor or None, got list"):
        call(s, t, labels=[[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match=r"labels must be on the logits' device cpu, got meta"):
        call(s.cpu(), t.cpu(), labels=torch.zeros(2, 3, dtype=torch.long, device="meta"))
    # int32 labels of the right shape are fine
    call(s, t, labels=torch.zeros(2, 3, dtype=torch.int32, device=device))


@pytest.mark.parametrize("name", LOSS_CALLS)
@pytest.mark.parametrize("value", [-100.0, "-100", None, True, torch.tensor(-100)])
def test_ignore_index_not_an_int(name, value, device):
    s, t = pair(device=device)
    labels = torch.zeros(3, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got " + type(value).__name__):
        LOSS_CALLS[name](s, t, labels=labels, ignore_index=value)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'reference'\), got 'cuda'"):
        with fastkd.use_backend("cuda"):
            pass
    assert backend._override is None


@pytest.mark.parametrize("name", ["kl_div", "softmax"])
def test_unknown_backend_in_environment(name, monkeypatch, device):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    s, t = pair(device=device)
    msg = r"FASTKD_BACKEND must be one of \('auto', 'triton', 'reference'\), got 'torch'"
    with pytest.raises(ValueError, match=msg):
        fastkd.kl_div(s, t) if name == "kl_div" else fastkd.softmax(s)


@pytest.mark.parametrize("name", list(LOSS_CALLS) + list(SOFTMAX_CALLS))
def test_triton_backend_on_cpu_without_interpreter(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, t = pair()
    msg = r"backend 'triton' cannot run on cpu tensors.*TRITON_INTERPRET=1"
    with fastkd.use_backend("triton"), pytest.raises(ValueError, match=msg):
        SOFTMAX_CALLS[name](s) if name in SOFTMAX_CALLS else LOSS_CALLS[name](s, t)
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cpu"):
        SOFTMAX_CALLS[name](s) if name in SOFTMAX_CALLS else LOSS_CALLS[name](s, t)
    # 'auto' falls back to the reference when the kernels cannot run
    monkeypatch.setenv("FASTKD_BACKEND", "auto")
    assert backend.resolve(s) == "reference"


# -- dispatch -------------------------------------------------------------------------------------

OP_NAMES = ("softmax", "kl_div_rows", "jsd_rows")


@pytest.fixture
def op_calls(monkeypatch):
    """Wrap the fused custom ops; the returned dict counts the calls that reach them."""
    calls = dict.fromkeys(OP_NAMES, 0)
    for op_name in OP_NAMES:
        original = getattr(ops, op_name)

        def wrapped(*args, _name=op_name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, op_name, wrapped)
    return calls


@pytest.fixture
def no_triton(monkeypatch):
    """Any call that reaches the fused ops fails."""
    def boom(*args, **kwargs):
        raise AssertionError("reached the Triton path")

    for op_name in OP_NAMES:
        monkeypatch.setattr(ops, op_name, boom)


def run_all(device, labels=False):
    """One call of each public function; returns how many calls each fused op should see."""
    s, t = pair((4, 12), device=device)
    lab = torch.tensor([1, -100, 3, 0], device=device) if labels else None
    fastkd.softmax(s, 2.0)
    fastkd.log_softmax(s, 2.0)
    fastkd.kl_div(s, t, 2.0, labels=lab)
    fastkd.kl_div(s, t, 2.0, reverse=True, labels=lab)
    fastkd.jsd(s, t, 0.3, 2.0, labels=lab)
    fastkd.jsd(s, t, 1.0, 2.0, labels=lab)  # beta = 1 is reverse KL: the KL op
    fastkd.KLDiv(temp=2.0)(s, t, labels=lab)
    fastkd.JSD(beta=0.7, temp=2.0)(s, t, labels=lab)
    return {"softmax": 2, "kl_div_rows": 4, "jsd_rows": 2}


def test_reference_backend_does_not_reach_triton(no_triton, device):
    with fastkd.use_backend("reference"):
        run_all(device)
        run_all(device, labels=True)
    with pytest.raises(AssertionError, match="reached the Triton path"):
        fastkd.kl_div(*pair(device=device))


@pytest.mark.parametrize("name", ["auto", "triton"])
def test_triton_and_auto_reach_the_kernels(name, op_calls, device):
    with fastkd.use_backend(name):
        expected = run_all(device)
    assert op_calls == expected


def test_default_is_auto_and_reaches_the_kernels(op_calls, monkeypatch, device):
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)
    assert backend.resolve(logits((2, 3), device=device)) == "triton"
    expected = run_all(device)
    assert op_calls == expected


def test_triton_path_grad_fn(device):
    """The fused losses leave the custom op's backward in the graph; the reference does not."""
    s, t = leaf(logits((3, 10), device=device)), logits((3, 10), device=device, seed=1)

    def graph_names(loss):
        names, stack, seen = set(), [loss.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
        return names

    fused = graph_names(fastkd.kl_div(s, t, reduction="none"))
    with fastkd.use_backend("reference"):
        eager = graph_names(fastkd.kl_div(s, t, reduction="none"))
    assert not any("LogSoftmax" in n for n in fused), fused
    assert any("LogSoftmax" in n for n in eager), eager


def test_environment_reference_overrides_auto(no_triton, monkeypatch, device):
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    assert backend.resolve(logits((2, 3), device=device)) == "reference"
    run_all(device)
    run_all(device, labels=True)


def test_context_manager_overrides_environment(op_calls, monkeypatch, device):
    monkeypatch.setenv("FASTKD_BACKEND", "reference")
    with fastkd.use_backend("triton"):
        expected = run_all(device)
    assert op_calls == expected


def test_context_manager_nests_and_restores(device):
    x = logits((2, 3), device=device)
    assert backend._override is None and backend.resolve(x) == "triton"
    with fastkd.use_backend("reference"):
        assert backend.resolve(x) == "reference"
        with fastkd.use_backend("triton"):
            assert backend.resolve(x) == "triton"
            with fastkd.use_backend("auto"):
                assert backend.resolve(x) == "triton"
            assert backend.resolve(x) == "triton"
        assert backend.resolve(x) == "reference"
    assert backend._override is None and backend.resolve(x) == "triton"


def test_context_manager_restores_on_exception(device):
    x = logits((2, 3), device=device)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with fastkd.use_backend("reference"):
            try:
                with fastkd.use_backend("triton"):
                    raise Boom
            finally:
                assert backend.resolve(x) == "reference"
    assert backend._override is None and backend.resolve(x) == "triton"
    # a failing call inside the block does not leave the override behind either
    with pytest.raises(ValueError, match="temperature"):
        with fastkd.use_backend("reference"):
            fastkd.kl_div(x, x, 0.0)
    assert backend._override is None


# -- both backends agree --------------------------------------------------------------------------

FUNCTIONS = {
    "kl_div": (fastkd.kl_div, {}),
    "reverse_kl": (fastkd.kl_div, {"reverse": True}),
    "jsd": (fastkd.jsd, {"beta": 0.3}),
    "jsd_beta0": (fastkd.jsd, {"beta": 0.0}),
    "jsd_beta1": (fastkd.jsd, {"beta": 1.0}),
}


def both_backends(fn, *args, **kwargs):
    results = []
    for name in ("triton", "reference"):
        with fastkd.use_backend(name):
            results.append(fn(*args, **kwargs))
    return results


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("with_labels", [False, True])
def test_backends_agree_on_losses(name, reduction, with_labels, device):
    fn, kw = FUNCTIONS[name]
    s, t = leaf(logits((2, 3, 37), device=device)), leaf(logits((2, 3, 37), device=device, seed=1))
    labels = torch.tensor([[1, -100, 4], [-100, 0, 7]], device=device) if with_labels else None
    (fused, (gs, gt)), (eager, (ref_gs, ref_gt)) = both_backends(
        loss_and_grads, fn, s, t, temperature=2.0, labels=labels, reduction=reduction, **kw
    )
    assert fused.shape == eager.shape and fused.dtype == eager.dtype == torch.float32
    assert rel_err(fused, eager) <= 1e-5
    assert rel_err(gs, ref_gs) <= 1e-5 and rel_err(gt, ref_gt) <= 1e-5


@pytest.mark.parametrize("name", SOFTMAX_CALLS)
def test_backends_agree_on_softmax(name, device):
    x = leaf(logits((2, 3, 37), device=device))
    weight = logits((2, 3, 37), device=device, seed=2)
    outs = []
    for backend_name in ("triton", "reference"):
        with fastkd.use_backend(backend_name):
            y = SOFTMAX_CALLS[name](x, 1.5)
            (g,) = torch.autograd.grad((y * weight).sum(), x)
            outs.append((y.detach(), g))
    (y, g), (ref_y, ref_g) = outs
    assert y.shape == ref_y.shape == x.shape and y.dtype == ref_y.dtype == torch.float32
    assert rel_err(y, ref_y) <= 1e-5 and rel_err(g, ref_g) <= 1e-5


# -- modules --------------------------------------------------------------------------------------

def seed_kldiv(s, t, T):
    """The seed's KLDiv, written out: batchmean of the elementwise KL, times T^2 (2-D input)."""
    return F.kl_div(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1), reduction="none").sum(1).mean() * T**2


def test_kldiv_module_matches_functional(device):
    s, t = pair((5, 40), device=device)
    module = fastkd.KLDiv(temp=4.0)
    assert isinstance(module, torch.nn.Module)
    expected = fastkd.kl_div(s, t, 4.0)
    assert torch.equal(module(s, t), expected)
    # the seed's call shape: extra keyword arguments (target=...) are accepted and ignored
    target = torch.randint(0, 40, (5,), device=device)
    assert torch.equal(module(s, t, target=target), expected)
    assert torch.equal(module(s, t, target=target, epoch=3, anything=None), expected)
    assert torch.equal(fastkd.KLDiv()(s, t), fastkd.kl_div(s, t))
    assert torch.equal(fastkd.KLDiv(4.0, reverse=True)(s, t), fastkd.kl_div(s, t, 4.0, reverse=True))
    assert torch.equal(fastkd.KLDiv(temp=4.0, reduction="sum")(s, t), fastkd.kl_div(s, t, 4.0, reduction="sum"))


def test_kldiv_module_labels(device):
    s, t = pair((2, 3, 20), device=device)
    labels = torch.tensor([[1, 7, 4], [7, 0, 7]], device=device)
    module = fastkd.KLDiv(temp=2.0, ignore_index=7, reduction="none")
    loss = module(s, t, labels=labels)
    assert torch.equal(loss, fastkd.kl_div(s, t, 2.0, labels=labels, ignore_index=7, reduction="none"))
    assert loss.shape == (2, 3) and (loss[labels == 7] == 0).all() and (loss[labels != 7] > 0).all()
    assert torch.equal(fastkd.KLDiv(temp=2.0, ignore_index=7)(s, t, labels=labels, target=labels),
                       fastkd.kl_div(s, t, 2.0, labels=labels, ignore_index=7))
    # positional labels work too
    assert torch.equal(fastkd.KLDiv(temp=2.0)(s, t, labels), fastkd.kl_div(s, t, 2.0, labels=labels))


def test_jsd_module_matches_functional(device):
    s, t = pair((5, 40), device=device)
    module = fastkd.JSD(beta=0.3, temp=2.0)
    expected = fastkd.jsd(s, t, 0.3, 2.0)
    assert torch.equal(module(s, t), expected)
    assert torch.equal(module(s, t, target=torch.zeros(5, dtype=torch.long, device=device), step=1), expected)
    assert torch.equal(fastkd.JSD()(s, t), fastkd.jsd(s, t))
    assert torch.equal(fastkd.JSD(0.0, 3.0)(s, t), fastkd.kl_div(s, t, 3.0))
    assert torch.equal(fastkd.JSD(1.0, 3.0)(s, t), fastkd.kl_div(s, t, 3.0, reverse=True))
    labels = torch.tensor([0, -100, 2, 3, -100], device=device)
    loss = fastkd.JSD(beta=0.3, temp=2.0, reduction="none")(s, t, labels=labels)
    assert torch.equal(loss, fastkd.jsd(s, t, 0.3, 2.0, labels=labels, reduction="none"))
    assert (loss[labels == -100] == 0).all() and (loss[labels != -100] > 0).all()


@pytest.mark.parametrize("T", [1.0, 4.0, 0.5])
@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_kldiv_module_matches_seed_formula(T, backend_name, device):
    s, t = leaf(logits((6, 50), device=device)), logits((6, 50), device=device, seed=1)
    with fastkd.use_backend(backend_name):
        loss = fastkd.KLDiv(temp=T)(s, t, target=torch.zeros(6, dtype=torch.long, device=device))
    s64 = leaf(s.double())
    expected = seed_kldiv(s64, t.double(), T)
    assert loss.shape == () and rel_err(loss.detach(), expected.detach()) <= 1e-5
    (g,) = torch.autograd.grad(loss, s)
    (ref_g,) = torch.autograd.grad(expected, s64)
    assert rel_err(g, ref_g) <= 1e-5


def test_module_arguments_are_checked_at_call(device):
    s, t = pair(device=device)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.KLDiv(temp=0.0)(s, t)
    with pytest.raises(ValueError, match="reduction='mean' is refused"):
        fastkd.KLDiv(reduction="mean")(s, t)
    with pytest.raises(ValueError, match="beta must be finite"):
        fastkd.JSD(beta=2.0)(s, t)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fastkd.JSD(ignore_index=None)(s, t)


# -- output shapes and dtypes ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype,loss_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(5, 17), (2, 3, 17), (1, 2, 2, 17), (17,)])
@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_reduction_none_shape_and_dtype(dtype, loss_dtype, shape, backend_name, device):
    s, t = leaf(logits(shape, dtype, device=device)), leaf(logits(shape, dtype, device=device, seed=1))
    with fastkd.use_backend(backend_name):
        for fn, kw in FUNCTIONS.values():
            loss = fn(s, t, temperature=2.0, reduction="none", **kw)
            assert loss.shape == shape[:-1] and loss.dtype == loss_dtype, (fn, kw, loss.shape, loss.dtype)
            assert torch.isfinite(loss).all() and (loss >= 0).all()
            for reduction in ("batchmean", "sum"):
                reduced = fn(s, t, temperature=2.0, reduction=reduction, **kw)
                assert reduced.shape == () and reduced.dtype == loss_dtype
            gs, gt = torch.autograd.grad(loss.sum(), (s, t))
            assert gs.dtype == gt.dtype == dtype and gs.shape == gt.shape == shape
        for fn in SOFTMAX_CALLS.values():
            y = fn(s, 2.0)
            assert y.shape == shape and y.dtype == dtype
