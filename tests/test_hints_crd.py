"""CRD: the fused NCE kernel against the code's formulation in fp64 (fp32, bf16, strided inputs, several
programs per sample, no negatives, a bad index), gradcheck on the kernel, argument errors, the memory claim
(no [N, K+1, D] gather, no [N, K+1] scores, no host sync), and the module against an eager
re-implementation of RepDistiller's CRDLoss: loss, gradients, normalisers and memory updates."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastkd
from fastkd.hints import crd as crd_module
from fastkd.hints.crd import CRD, crd_loss, crd_loss_reference, crd_normaliser
from fastkd.traffic import OpLog
from helpers import DEVICE, leaf, randint, randn, rel_err


def embeddings(N, D, seed):
    return F.normalize(randn((N, D), seed), dim=1)


def bank(n, D, seed):
    """Uniform rows in +-1/sqrt(D / 3), as the code initialises its memory."""
    u = torch.rand(n, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, device="cpu")
    return ((u * 2 - 1) * math.sqrt(3 / D)).to(DEVICE)


def problem(N, D, n_data, K, dtype=torch.float32, seed=0):
    v_s, v_t = leaf(embeddings(N, D, seed).to(dtype)), leaf(embeddings(N, D, seed + 1).to(dtype))
    memory_s, memory_t = bank(n_data, D, seed + 2).float(), bank(n_data, D, seed + 3).float()
    return v_s, v_t, memory_s, memory_t, randint(n_data, (N, K + 1), seed + 4)


def check(v_s, v_t, memory_s, memory_t, idx, loss_tol=1e-5, grad_tol=1e-5, temperature=0.07):
    """Fused normalisers, loss and gradients against the reference on fp64 copies."""
    with fastkd.use_backend("triton"):
        z_s = crd_normaliser(v_s, memory_t, idx, temperature=temperature)
        z_t = crd_normaliser(v_t, memory_s, idx, temperature=temperature)
        loss = crd_loss(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, temperature=temperature)
    grads = torch.autograd.grad(loss, (v_s, v_t))
    s64, t64, ms64, mt64 = leaf(v_s.double()), leaf(v_t.double()), memory_s.double(), memory_t.double()
    with fastkd.use_backend("reference"):
        ref_z = (crd_normaliser(s64, mt64, idx, temperature=temperature),
                 crd_normaliser(t64, ms64, idx, temperature=temperature))
    ref = crd_loss_reference(s64, t64, ms64, mt64, idx, *ref_z, temperature=temperature)
    ref_grads = torch.autograd.grad(ref, (s64, t64))
    assert loss.shape == () and loss.dtype == torch.float32 and float(ref.detach()) > 1e-3
    assert rel_err(z_s, ref_z[0]) <= loss_tol and rel_err(z_t, ref_z[1]) <= loss_tol
    assert rel_err(loss.detach(), ref.detach()) <= loss_tol, (float(loss), float(ref))
    for x, g, rg in zip((v_s, v_t), grads, ref_grads):
        assert g.dtype == x.dtype and g.shape == x.shape and float(rg.norm()) > 0
        assert rel_err(g, rg) <= grad_tol, rel_err(g, rg)


@pytest.mark.parametrize("N,D,n_data,K", [(3, 8, 50, 10), (5, 128, 400, 150), (4, 33, 100, 0)])
def test_fp32_matches_reference(N, D, n_data, K):
    """D = 128 (the default feat_dim): 32-row tiles, K + 1 = 151 rows in 5 of them; odd D; K = 0."""
    check(*problem(N, D, n_data, K))


def test_several_programs_per_sample(monkeypatch):
    """Small tiles: each sample's K + 1 = 61 rows are split over 3 programs of up to 6 tiles of 4 rows."""
    monkeypatch.setattr(fastkd.kernels.crd, "TILE", 64)
    assert fastkd.kernels.crd._geometry(3, 61, 16) == (4, 16, 24, 3)
    check(*problem(3, 16, 80, 60), temperature=0.2)


def test_strided_inputs():
    """Column-strided and transposed embeddings, a transposed bank (row stride 1), a transposed index."""
    v_s, v_t, memory_s, memory_t, idx = problem(4, 12, 60, 20)
    wide = leaf(torch.stack([v_s.detach(), -v_s.detach()], 2).reshape(4, 24))  # v_s in the even columns
    check(wide[:, ::2], leaf(v_t.detach().T.contiguous()).T, memory_s.T.contiguous().T, memory_t,
          idx.T.contiguous().T)


def test_bf16():
    check(*problem(4, 32, 70, 30, torch.bfloat16), grad_tol=1e-2)


def test_index_outside_the_bank_gives_nan():
    """What a GPU sees (no range check: it would wait for the device): NaN, never an out-of-bounds read."""
    v_s, v_t, memory_s, memory_t, idx = problem(3, 8, 50, 10)
    idx[1, 4] = 50
    with fastkd.use_backend("triton"):
        assert torch.isnan(crd_loss(v_s, v_t, memory_s, memory_t, idx, 3.0, 4.0))
        idx[1, 4] = -1
        assert torch.isnan(crd_loss(v_s, v_t, memory_s, memory_t, idx, 3.0, 4.0))


def test_gradcheck_fp64_kernel():
    v_s, v_t, memory_s, memory_t, idx = problem(3, 5, 20, 7, torch.float64)
    with fastkd.use_backend("triton"):
        assert torch.autograd.gradcheck(
            lambda a, b: crd_loss(a, b, memory_s.double(), memory_t.double(), idx, 0.4, 0.3, temperature=0.5),
            (v_s, v_t), fast_mode=True)


def test_wide_embeddings_run_the_reference(monkeypatch):
    monkeypatch.setattr(crd_module, "MAX_D", 4)
    v_s, v_t, memory_s, memory_t, idx = problem(3, 8, 50, 10)
    with fastkd.use_backend("triton"), OpLog() as log:
        crd_loss(v_s, v_t, memory_s, memory_t, idx, 3.0, 4.0)
    assert (3 * 11, 8) in [shape for _, shape in log.allocations(1)]  # the code's gather


def test_bad_input():
    v_s, v_t, memory_s, memory_t, idx = problem(3, 8, 50, 10)
    with pytest.raises(ValueError, match="v_t must have shape"):
        crd_loss(v_s, v_t[None], memory_s, memory_t, idx, 1.0, 1.0)
    with pytest.raises(ValueError, match="match in dim 1"):
        crd_loss(v_s, v_t[:, :4], memory_s, memory_t, idx, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"memory_t must have shape \[n_data, 8\]"):
        crd_loss(v_s, v_t, memory_s, memory_t[:, :4], idx, 1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        crd_loss(v_s, v_t, memory_s[:10], memory_t, idx, 1.0, 1.0)
    with pytest.raises(TypeError, match="idx must be an int32 or int64"):
        crd_loss(v_s, v_t, memory_s, memory_t, idx.float(), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"idx must have shape \[N, K \+ 1\]"):
        crd_loss(v_s, v_t, memory_s, memory_t, idx[:2], 1.0, 1.0)
    with pytest.raises(ValueError, match="z_s must be finite and in"):
        crd_loss(v_s, v_t, memory_s, memory_t, idx, 0.0, 1.0)
    with pytest.raises(ValueError, match="z_t must be a positive number or a 1-element"):
        crd_loss(v_s, v_t, memory_s, memory_t, idx, 1.0, torch.ones(2))
    with pytest.raises(ValueError, match="temperature"):
        crd_loss(v_s, v_t, memory_s, memory_t, idx, 1.0, 1.0, temperature=0.0)
    with pytest.raises(ValueError, match="nce_m"):
        CRD(4, 4, 10, nce_m=1.5)
    with pytest.raises(ValueError, match="n_data must be a positive int"):
        CRD(4, 4, 0)
    module = CRD(4, 6, 10, feat_dim=8, nce_k=5)
    with pytest.raises(ValueError, match=r"contrast_idx must have shape \[N, nce_k \+ 1\] = \[2, 6\]"):
        module(torch.randn(2, 4), torch.randn(2, 6), torch.tensor([0, 1]), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be an integer tensor of shape \[2\]"):
        module(torch.randn(2, 4), torch.randn(2, 6), torch.tensor([0.0, 1.0]))


class RepDistillerCRD(torch.nn.Module):
    """RepDistiller's CRDLoss re-implemented eagerly for this test: linear + L2-norm heads; a contrast memory
    with two uniform-initialised banks, its alias sampler (uniform weights: every entry keeps its own index),
    Z set from the first batch through the host, the momentum update; the NCE ContrastLoss on each side."""

    def __init__(self, s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m):
        super().__init__()
        self.n_data, self.k, self.t, self.m = n_data, nce_k, nce_t, nce_m
        self.embed_s, self.embed_t = torch.nn.Linear(s_dim, feat_dim), torch.nn.Linear(t_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv))
        self.z = [-1.0, -1.0]

    def draw(self, count):
        """The alias method for uniform weights: a uniform index, kept with probability 1."""
        kk = torch.zeros(count, dtype=torch.long).random_(0, self.n_data)
        keep = torch.bernoulli(torch.ones(count)).long()
        return kk * keep + torch.zeros_like(kk) * (1 - keep)

    def contrast_loss(self, p):
        k = p.shape[1] - 1
        noise = k / self.n_data
        positive = torch.log(p[:, 0] / (p[:, 0] + noise + 1e-7))
        negatives = torch.log(torch.full_like(p[:, 1:], noise) / (p[:, 1:] + noise + 1e-7))
        return -(positive.sum(0) + negatives.reshape(-1, 1).sum(0)) / p.shape[0]

    def forward(self, f_s, f_t, y, contrast_idx=None):
        v1, v2 = self.embed_s(f_s), self.embed_t(f_t)
        v1 = v1 / v1.pow(2).sum(1, keepdim=True).pow(0.5)
        v2 = v2 / v2.pow(2).sum(1, keepdim=True).pow(0.5)
        n = v1.shape[0]
        if contrast_idx is None:
            contrast_idx = self.draw(n * (self.k + 1)).view(n, -1)
            contrast_idx[:, 0] = y
        out_v2 = torch.exp(torch.bmm(self.memory_v1[contrast_idx].detach(), v2[:, :, None]) / self.t)[:, :, 0]
        out_v1 = torch.exp(torch.bmm(self.memory_v2[contrast_idx].detach(), v1[:, :, None]) / self.t)[:, :, 0]
        for side, out in enumerate((out_v1, out_v2)):
            if self.z[side] < 0:
                self.z[side] = (out.mean() * self.n_data).item()
        out_v1, out_v2 = out_v1 / self.z[0], out_v2 / self.z[1]
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                rows = memory.index_select(0, y) * self.m + v * (1 - self.m)
                memory.index_copy_(0, y, rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))
        return self.contrast_loss(out_v1) + self.contrast_loss(out_v2)


def test_module_matches_repdistiller():
    """Same seed for the initialisation and for each step's negatives: the fused fp32 module and the eager
    fp64 re-implementation agree on the loss, the gradients of the heads and of f_s, Z and the banks, over
    three steps (two drawing negatives, one with the dataset's contrast_idx)."""
    sizes = dict(n_data=60, feat_dim=16, nce_k=40, nce_t=0.07, nce_m=0.5)
    torch.manual_seed(0)
    ours = CRD(12, 20, **sizes)
    torch.manual_seed(0)
    theirs = RepDistillerCRD(12, 20, **sizes).double()
    assert torch.equal(ours.embed_s.linear.weight, theirs.embed_s.weight.float())
    assert torch.equal(ours.memory_t, theirs.memory_v2.float())
    for step in range(3):
        f_s, f_t = randn((6, 12), seed=10 + step), randn((6, 20), seed=20 + step)
        y = torch.randperm(60, generator=torch.Generator().manual_seed(step), device="cpu")[:6].to(DEVICE)
        given = randint(60, (6, 41), seed=30) if step == 2 else None
        if given is not None:
            given[:, 0] = y
        xs, xs64 = leaf(f_s.float()), leaf(f_s)
        torch.manual_seed(100 + step)
        with fastkd.use_backend("triton"):
            loss = ours(xs, f_t.float(), y, given)
        torch.manual_seed(100 + step)
        ref = theirs(xs64, f_t, y, given)
        assert loss.shape == () and rel_err(loss.detach(), ref.detach()[0]) <= 1e-5
        loss.backward()
        ref.sum().backward()
        pairs = [(xs, xs64)] + list(zip(ours.parameters(), theirs.parameters()))
        for a, b in pairs:
            assert rel_err(a.grad, b.grad) <= 1e-5, rel_err(a.grad, b.grad)
            a.grad = b.grad = None
        assert rel_err(ours.z, torch.tensor(theirs.z, dtype=torch.float64)) <= 1e-6
        assert rel_err(ours.memory_s, theirs.memory_v1) <= 1e-6 and rel_err(ours.memory_t, theirs.memory_v2) <= 1e-6


def test_normalisers_survive_load_state_dict():
    """Z set on a first forward travels in the state dict and is kept (not re-estimated) after loading."""
    torch.manual_seed(0)
    first = CRD(4, 6, 30, feat_dim=8, nce_k=10)
    with fastkd.use_backend("triton"):
        first(randn((3, 4)).float(), randn((3, 6), seed=1).float(), torch.tensor([0, 1, 2]))
        assert (first.z > 0).all()
        second = CRD(4, 6, 30, feat_dim=8, nce_k=10)
        second(randn((3, 4)).float(), randn((3, 6), seed=1).float(), torch.tensor([0, 1, 2]))
        second.load_state_dict(first.state_dict())
        second(randn((3, 4), seed=2).float(), randn((3, 6), seed=3).float(), torch.tensor([3, 4, 5]))
    assert torch.equal(second.z, first.z)


@pytest.mark.interpreter
def test_no_gather_no_scores_no_host_sync():
    """The fused loss and its backward allocate nothing of [N, K+1] elements or more (the partial gradients
    [N, splits, D] are bounded by it), and the module's steady-state step (draw, loss, backward, memory update)
    never waits for the host; the code's formulation allocates the [N, K+1, D] gather (the check can fail)."""
    N, D, n_data, K = 4, 16, 300, 1000
    v_s, v_t, memory_s, memory_t, idx = problem(N, D, n_data, K)
    z = torch.tensor(5.0)
    with OpLog() as log, fastkd.use_backend("triton"):
        torch.autograd.grad(crd_loss(v_s, v_t, memory_s, memory_t, idx, z, z), (v_s, v_t))
    assert max(torch.Size(shape).numel() for _, shape in log.allocations(1)) < N * (K + 1)
    assert log.host_syncs() == []
    with OpLog() as log:
        crd_loss_reference(v_s, v_t, memory_s, memory_t, idx, z, z)
    assert (N * (K + 1), D) in [shape for _, shape in log.allocations(1)]
    module = CRD(8, 8, n_data, feat_dim=D, nce_k=K)
    f = randn((N, 8)).float().requires_grad_()
    with fastkd.use_backend("triton"):
        module(f, f.detach(), torch.arange(N))
        with OpLog() as log:
            module(f, f.detach(), torch.arange(N)).backward()
    assert log.host_syncs() == []


def test_opcheck():
    v_s, _, _, memory_t, idx = problem(3, 8, 50, 10, torch.float64)
    z = torch.tensor(2.0, dtype=torch.float64)
    torch.library.opcheck(crd_module.crd_nce, (v_s, memory_t.double(), idx, z, 0.1, True))
    torch.library.opcheck(crd_module.crd_nce, (v_s.detach(), memory_t.double(), idx, z, 0.1, False))
    torch.library.opcheck(crd_module.crd_exp_sum, (v_s.detach(), memory_t, idx, 0.1))
