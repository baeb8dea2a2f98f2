"""Small models for the engine tests (float64 so comparisons are tight)."""

import torch
import torch.nn as nn

C = 4  # classes in the engine tests


class MLP(nn.Module):
    def __init__(self, d=6, h=16, c=C, dropout=0.0):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Dropout(dropout))
        self.fc = nn.Linear(h, c)

    def forward(self, x):
        return self.fc(self.body(x))


class CNN(nn.Module):
    """Conv → BatchNorm → ReLU → Linear: exercises running statistics."""

    def __init__(self, c=C):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 5 * 5, c)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    return (MLP(**kw) if kind == "mlp" else CNN(**kw)).double()


def make_batch(kind, n, seed, c=C):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if kind == "mlp" else (n, 2, 5, 5)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y


class Logits(nn.Module):
    """Returns its input plus a zero parameter: ``b.grad`` is the logit gradient G."""

    def __init__(self, n, c, dtype=torch.float64):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(n, c, dtype=dtype))

    def forward(self, z):
        return z + self.b
