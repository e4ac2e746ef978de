"""Contrastive representation distillation (Tian, Krishnan and Isola, "Contrastive Representation
Distillation", ICLR 2020).

Follows the authors' RepDistiller (crd/criterion.py CRDLoss, ContrastLoss, Embed; crd/memory.py
ContrastMemory), as mdistiller (distillers/CRD.py) copies it, with its defaults: feat_dim 128, nce_k = 16384
negatives, nce_t = 0.07, nce_m = 0.5.  Student and teacher features are embedded (linear + L2 norm) to
feat_dim; two memory banks [n_data, feat_dim] (uniform init in +-1/sqrt(feat_dim / 3)) hold each side's
past embeddings.  For the K + 1 bank rows idx[i] of sample i (column 0 its own index, the positive):
    P_ik = exp(<memory_t[idx[i, k]], v_s[i]> / T) / Z_s      (and the teacher side with memory_s, Z_t)
    loss = ContrastLoss(P_s) + ContrastLoss(P_t),
    ContrastLoss(P) = -(sum_i log(P_i0 / (P_i0 + c)) + sum_{i, k>0} log(K Pn / (P_ik + c))) / N,
    Pn = 1 / n_data, c = K Pn + 1e-7.
Z is fixed on the first batch (mean of exp(score / T) times n_data), the banks are constants in the loss
and are then moved towards the batch's embeddings (momentum nce_m, renormalised), as the code does.
Negatives, when the caller gives none (`contrast_idx=None`), are drawn uniformly, as the code's alias
sampler does for its uniform weights (torch's integer draw: the same indices for the same seed).

Fused path: the scores, exp / Z, the NCE terms and their sum run in one Triton kernel per side that
gathers the bank rows itself (no [N, K+1, D] gather, no [N, K+1] scores), and the gradient w.r.t. the
embedding is formed in the same pass (see kernels/crd.py).  Differences from the code: Z is set without a
host sync (a Python flag, and the first forward after construction or load_state_dict keeps a Z that is
already set); the loss is 0-dim (the code's is [1]).  Embeddings wider than 4096 run the eager reference.
"""
import importlib
import math

import torch
from torch import Tensor, nn

from .. import backend
from .._checks import FLOAT_DTYPES, check_number, check_temperature
from ._checks import acc_dtype, check_features, check_pair

EPS = 1e-7  # the code's eps in ContrastLoss
MAX_D = 4096  # as kernels/crd.py (not imported here: importing it imports Triton)
_EMPTY = ()


def _kernels():
    return importlib.import_module("fastkd.kernels.crd")


# -- custom ops ------------------------------------------------------------------------------------

@torch.library.custom_op("fastkd::crd_nce", mutates_args=())
def crd_nce(v: Tensor, bank: Tensor, idx: Tensor, z: Tensor, temperature: float,
            need_grad: bool) -> tuple[Tensor, Tensor]:
    """One side's ContrastLoss of v [N, D] against bank[idx] with normaliser z -> (loss, d loss / d v, the
    latter computed in the same pass when need_grad, else empty), both fp32 (fp64 for fp64 inputs)."""
    loss, grad = _kernels().nce(v, bank, idx, z, temperature, need_grad)
    return loss, grad if need_grad else v.new_empty(_EMPTY, dtype=acc_dtype(v, bank))


@crd_nce.register_fake
def _(v, bank, idx, z, temperature, need_grad):
    acc = acc_dtype(v, bank)
    return v.new_empty((), dtype=acc), v.new_empty(v.shape if need_grad else _EMPTY, dtype=acc)


def _nce_setup(ctx, inputs, output):
    ctx.v_dtype, ctx.need_grad = inputs[0].dtype, inputs[5]
    ctx.save_for_backward(output[1])


def _nce_grad(ctx, grad_loss, _grad_of_grad):
    """The gradient formed in the forward pass, scaled (None when the forward was told not to form it)."""
    (grad,) = ctx.saved_tensors
    return ((grad * grad_loss).to(ctx.v_dtype) if ctx.need_grad else None), None, None, None, None, None


crd_nce.register_autograd(_nce_grad, setup_context=_nce_setup)


@torch.library.custom_op("fastkd::crd_exp_sum", mutates_args=())
def crd_exp_sum(v: Tensor, bank: Tensor, idx: Tensor, temperature: float) -> Tensor:
    """sum over the N (K+1) pairs of exp(<bank[idx[i, k]], v_i> / T) (not differentiable: Z is a constant)."""
    return _kernels().exp_sum(v, bank, idx, temperature)


@crd_exp_sum.register_fake
def _(v, bank, idx, temperature):
    return v.new_empty((), dtype=acc_dtype(v, bank))


# -- checks ---------------------------------------------------------------------------------------

def _check_bank_and_index(v, memory, idx, names=("v_s", "memory_t")):
    if not isinstance(memory, torch.Tensor):
        raise TypeError(f"{names[1]} must be a torch.Tensor, got {type(memory).__name__}")
    if memory.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{names[1]} must be a floating tensor, got {memory.dtype}")
    if memory.dim() != 2 or memory.shape[0] == 0 or memory.shape[1] != v.shape[1]:
        raise ValueError(f"{names[1]} must have shape [n_data, {v.shape[1]}] (the embeddings' width), got "
                         f"{tuple(memory.shape)}")
    if memory.device != v.device:
        raise ValueError(f"{names[1]} must be on the embeddings' device {v.device}, got {memory.device}")
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx must be an int32 or int64 tensor, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != v.shape[0] or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape [N, K + 1] = [{v.shape[0]}, K + 1] (positive first), got "
                         f"{tuple(idx.shape)}")
    if idx.device != v.device:
        raise ValueError(f"idx must be on the embeddings' device {v.device}, got {idx.device}")


def _normaliser_tensor(z, name, like):
    """Z as a 0-dim tensor on the device (a tensor is taken as is: checking its value would sync)."""
    if isinstance(z, torch.Tensor):
        if z.numel() != 1 or not z.dtype.is_floating_point:
            raise ValueError(f"{name} must be a positive number or a 1-element float tensor, got "
                             f"{z.dtype} of shape {tuple(z.shape)}")
        if z.device != like.device:
            raise ValueError(f"{name} must be on the embeddings' device {like.device}, got {z.device}")
        return z.reshape(())
    return torch.tensor(check_number(z, name, 0.0, math.inf, low_open=True), dtype=acc_dtype(like), device=like.device)


# -- the loss -------------------------------------------------------------------------------------

def _scores(v, memory, idx, z, temperature):
    """P [N, K+1] as the code forms it: the gathered rows [N, K+1, D], a batched product, exp, / Z."""
    rows = memory.index_select(0, idx.reshape(-1)).view(idx.shape[0], idx.shape[1], -1).detach()
    return torch.exp(torch.bmm(rows.to(v.dtype), v[:, :, None])[:, :, 0] / temperature) / z


def _contrast_loss(p, n_data):
    """The code's ContrastLoss of P [N, K+1] (column 0 the positive)."""
    k = p.shape[1] - 1
    c = k / n_data + EPS
    log_d1 = torch.log(p[:, 0] / (p[:, 0] + c))
    log_d0 = torch.log((k / n_data) / (p[:, 1:] + c))
    return -(log_d1.sum() + log_d0.sum()) / p.shape[0]


def _check(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, temperature):
    check_pair(v_s, v_t, ("v_s", "v_t"), ranks=(2,), same=(1,))
    _check_bank_and_index(v_s, memory_t, idx, ("v_s", "memory_t"))
    _check_bank_and_index(v_t, memory_s, idx, ("v_t", "memory_s"))
    if memory_s.shape != memory_t.shape:
        raise ValueError(f"memory_s and memory_t must have the same shape, got {tuple(memory_s.shape)} and "
                         f"{tuple(memory_t.shape)}")
    check_temperature(temperature)
    return _normaliser_tensor(z_s, "z_s", v_s), _normaliser_tensor(z_t, "z_t", v_t)


def crd_loss_reference(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, *, temperature=0.07):
    """The code's formulation, eager (fp32; fp64 for fp64 inputs)."""
    z_s, z_t = _check(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, temperature)
    acc = acc_dtype(v_s, v_t, memory_s)
    n_data = memory_s.shape[0]
    return (_contrast_loss(_scores(v_s.to(acc), memory_t, idx, z_s.to(acc), temperature), n_data)
            + _contrast_loss(_scores(v_t.to(acc), memory_s, idx, z_t.to(acc), temperature), n_data))


def crd_loss(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, *, temperature=0.07):
    """CRD's NCE loss of the embedded student and teacher v_s, v_t [N, D] (L2-normalised by the caller,
    as the Embed heads do) against the memory banks memory_s, memory_t [n_data, D] (memory_s holds past
    student embeddings and scores the teacher; memory_t the reverse), at the bank rows idx [N, K + 1]
    (column 0 the positive) with normalisers z_s, z_t (numbers or 1-element tensors) -> 0-dim float32
    (float64 for float64 inputs).  The banks and normalisers are constants; gradients reach v_s and v_t.
    Indices outside [0, n_data) give NaN on the fused path (no check: it would wait for the device)."""
    z_s, z_t = _check(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, temperature)
    if backend.resolve(v_s) != "triton" or v_s.shape[1] > MAX_D:
        return crd_loss_reference(v_s, v_t, memory_s, memory_t, idx, z_s, z_t, temperature=temperature)
    grad_on = torch.is_grad_enabled()
    loss_s, _ = crd_nce(v_s, memory_t.detach(), idx, z_s.detach(), temperature, grad_on and v_s.requires_grad)
    loss_t, _ = crd_nce(v_t, memory_s.detach(), idx, z_t.detach(), temperature, grad_on and v_t.requires_grad)
    return loss_s + loss_t


def crd_normaliser(v, memory, idx, *, temperature=0.07):
    """Z for the embeddings v [N, D] scored against memory [n_data, D] at idx [N, K + 1], as the code sets
    it on its first batch: mean over the N (K + 1) pairs of exp(score / T), times n_data -> 0-dim, no grad."""
    check_features(v, "v", ranks=(2,))
    _check_bank_and_index(v, memory, idx, ("v", "memory"))
    check_temperature(temperature)
    v, memory = v.detach(), memory.detach()
    if backend.resolve(v) == "triton" and v.shape[1] <= MAX_D:
        total = crd_exp_sum(v, memory, idx, temperature)
    else:
        total = torch.exp(torch.bmm(memory[idx].to(acc_dtype(v, memory)), v.to(acc_dtype(v, memory))[:, :, None])
                          / temperature).sum()
    return total / idx.numel() * memory.shape[0]


class Embed(nn.Module):
    """The code's embedding head: flatten, linear to feat_dim, divide by the L2 norm."""

    def __init__(self, dim_in, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class CRD(nn.Module):
    """CRD loss module with RepDistiller's CRDLoss defaults and state: the two Embed heads (trainable), the
    memory banks `memory_s`, `memory_t` and the normalisers `z` = (Z_s, Z_t) (buffers; -1 until set).

    forward(f_s, f_t, idx, contrast_idx=None): f_s [N, s_dim], f_t [N, t_dim] (flattened per sample), idx [N]
    the samples' dataset indices, contrast_idx [N, nce_k + 1] the bank rows (positive first) or None to draw
    nce_k uniform negatives.  Returns the loss (0-dim), then moves the banks' rows idx towards the batch."""

    def __init__(self, s_dim, t_dim, n_data, feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5):
        super().__init__()
        for value, name in ((s_dim, "s_dim"), (t_dim, "t_dim"), (n_data, "n_data"), (feat_dim, "feat_dim"),
                            (nce_k, "nce_k")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_number(nce_t, "nce_t", 0.0, math.inf, low_open=True)
        check_number(nce_m, "nce_m", 0.0, 1.0)
        self.n_data, self.nce_k, self.nce_t, self.nce_m = n_data, nce_k, nce_t, nce_m
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_t", torch.rand(n_data, feat_dim) * (2 * stdv) - stdv)
        self.register_buffer("z", torch.full((2,), -1.0))
        self._z_checked = False  # whether z holds this run's normalisers (set on the first forward)
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_z_checked", False))

    def _contrast_idx(self, idx, contrast_idx, n):
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64) or idx.shape != (n,):
            raise ValueError(f"idx must be an integer tensor of shape [{n}] (the samples' dataset indices), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if contrast_idx is None:
            contrast_idx = torch.randint(0, self.n_data, (n, self.nce_k + 1), device=self.memory_s.device)
            contrast_idx[:, 0] = idx
        elif not isinstance(contrast_idx, torch.Tensor) or contrast_idx.shape != (n, self.nce_k + 1):
            raise ValueError(f"contrast_idx must have shape [N, nce_k + 1] = [{n}, {self.nce_k + 1}] (positive "
                             f"first), got {tuple(getattr(contrast_idx, 'shape', ()))}")
        return contrast_idx

    def _set_normalisers(self, v_s, v_t, contrast_idx):
        """Z from this batch where it is unset (-1), kept where set: no host sync."""
        fresh = torch.stack([crd_normaliser(v_s, self.memory_t, contrast_idx, temperature=self.nce_t),
                             crd_normaliser(v_t, self.memory_s, contrast_idx, temperature=self.nce_t)])
        self.z.copy_(torch.where(self.z < 0, fresh.to(self.z.dtype), self.z))
        self._z_checked = True

    @torch.no_grad()
    def _update_memory(self, memory, v, idx):
        rows = memory.index_select(0, idx) * self.nce_m + v.to(memory.dtype) * (1 - self.nce_m)
        memory.index_copy_(0, idx, rows / rows.pow(2).sum(1, keepdim=True).pow(0.5))

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
        contrast_idx = self._contrast_idx(idx, contrast_idx, v_s.shape[0])
        if not self._z_checked:
            self._set_normalisers(v_s, v_t, contrast_idx)
        loss = crd_loss(v_s, v_t, self.memory_s, self.memory_t, contrast_idx, self.z[0], self.z[1],
                        temperature=self.nce_t)
        self._update_memory(self.memory_s, v_s.detach(), idx.long())
        self._update_memory(self.memory_t, v_t.detach(), idx.long())
        return loss

    def extra_repr(self):
        return f"n_data={self.n_data}, nce_k={self.nce_k}, nce_t={self.nce_t}, nce_m={self.nce_m}"
