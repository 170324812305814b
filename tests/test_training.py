"""A real training run: an MLP on scikit-learn's 8×8 digits learns with Muon."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import matrixopt
from helpers import digits


@pytest.mark.parametrize("groups", [False, True], ids=["parameters", "param_groups"])
def test_mlp_on_digits(groups):
    Xtr, ytr, Xte, yte = digits()
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(hidden1=nn.Linear(64, 64), act1=nn.ReLU(), hidden2=nn.Linear(64, 64),
                                      act2=nn.ReLU(), classifier=nn.Linear(64, 10)))
    # param_groups puts the classifier on the AdamW fallback; plain parameters() orthogonalize it
    params = matrixopt.param_groups(model) if groups else model.parameters()
    opt = matrixopt.Muon(params, lr=0.01, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(model(Xtr), ytr).item()
    for _ in range(300):
        idx = torch.randint(0, len(ytr), (64,), generator=g)
        opt.zero_grad()
        loss_fn(model(Xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        end = loss_fn(model(Xtr), ytr).item()
        accuracy = (model(Xte).argmax(1) == yte).float().mean().item()
    assert start > 2.0  # chance level is ln 10 ≈ 2.3
    assert end < 0.1 * start
    assert accuracy > 0.9
