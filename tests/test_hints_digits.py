"""Real data: distil a small CNN on scikit-learn's bundled digits (1797 8x8 images, no download) with AT and FitNet
hints plus cross-entropy, once on the fused Triton kernels (under the interpreter here) and once on the eager
references: the two loss curves must agree at every step, and the loss must go down.

The teacher (two conv stages, 8 and 16 channels) is trained briefly here in float64 (Adam, 60 steps; it reaches
95% on the 397 held-out digits), then frozen.  The student (4 and 8 channels) learns from its labels, from AT on
both stages (the module AT: mdistiller's weight 1000 times at_loss) and from a FitNet hint (the module FitNet: its
first stage, 8x8, regressed by the authors' ConvReg, a 3x3 stride-2 convolution, onto the teacher's second stage,
4x4; mdistiller's weight 100), by SGD (lr 0.005, momentum 0.9, 16 steps of 8 digits: the interpreter runs one
program per sample at a time).
Everything runs in float64 so that the two backends can only differ by rounding.
"""
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from triton.runtime import interpreter

import fastkd
from fastkd.hints.at import AT
from fastkd.hints.fitnet import FitNet
from helpers import DEVICE

pytestmark = pytest.mark.interpreter  # counts the interpreter's kernel launches
DTYPE = torch.float64
STEPS, BATCH = 16, 8


class Net(nn.Module):
    """conv 3x3 + ReLU (8x8 map), conv 3x3 stride 2 + ReLU (4x4 map), linear on the flattened map: logits and the
    two stages' maps."""

    def __init__(self, c1, c2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.fc = nn.Linear(c2 * 16, 10)

    def forward(self, x):
        f1 = F.relu(self.conv1(x))
        f2 = F.relu(self.conv2(f1))
        return self.fc(f2.flatten(1)), [f1, f2]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These convolutions are tiny: torch's thread pool costs more than it saves (10x on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.images, dtype=DTYPE).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order].to(DEVICE), y[order].to(DEVICE)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.fixture(scope="module")
def teacher(digits):
    (x, y), (x_test, y_test) = digits
    torch.manual_seed(0)
    net = Net(8, 16).to(device=DEVICE, dtype=DTYPE)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for step in range(60):
        idx = slice(step * 128 % 1280, step * 128 % 1280 + 128)
        loss = F.cross_entropy(net(x[idx])[0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    accuracy = float((net(x_test)[0].argmax(1) == y_test).double().mean())
    assert accuracy > 0.9, accuracy  # a teacher worth distilling
    return net


def distil(backend, digits, teacher):
    """STEPS SGD steps of the student from the same initial weights on the same batches; the losses per step."""
    (x, y), _ = digits
    torch.manual_seed(1)
    student = Net(4, 8).to(device=DEVICE, dtype=DTYPE)
    fitnet = FitNet((BATCH, 4, 8, 8), (BATCH, 16, 4, 4)).to(device=DEVICE, dtype=DTYPE)
    at = AT()
    opt = torch.optim.SGD([*student.parameters(), *fitnet.parameters()], lr=0.005, momentum=0.9)
    losses = []
    with fastkd.use_backend(backend):
        for step in range(STEPS):
            idx = slice(step * BATCH % 1344, step * BATCH % 1344 + BATCH)
            logits, (s1, s2) = student(x[idx])
            _, (t1, t2) = teacher(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + at([s1, s2], [t1, t2]) + fitnet(s1, t2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return torch.tensor(losses, dtype=DTYPE)


def test_fused_and_reference_training_agree(digits, teacher, monkeypatch):
    launches = []
    run = interpreter.GridExecutor.__call__

    def counting(executor, *args, **kwargs):
        launches.append(executor)
        return run(executor, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counting)
    fused = distil("triton", digits, teacher)
    fused_launches = len(launches)
    reference = distil("reference", digits, teacher)
    assert fused_launches >= 2 * STEPS and len(launches) == fused_launches  # AT's kernels ran on one side only
    rel = ((fused - reference).abs() / reference.abs()).max()
    assert rel <= 1e-10, (rel, fused, reference)  # fp64: agreement to rounding (1e-4 is the bar asked for)
    assert torch.isfinite(fused).all()
    assert fused[-5:].mean() < 0.5 * fused[:5].mean(), fused  # the student learns
