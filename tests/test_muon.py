"""train.optimizer=muon: Muon on the hidden convolutions and linear layers, AdamW on the rest."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from image_classifier.models.factory import create_model
from image_classifier.models.muon import MuonAdamW, hidden_weights, orthogonalize
from image_classifier.models.optim import create_optimizer


@pytest.mark.parametrize("shape", [(32, 288), (288, 32), (64, 128)])
def test_orthogonalize_gives_the_polar_factor_up_to_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.5 and s.max() < 1.5, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh  # the exact answer the Newton-Schulz iteration approximates
    cosine = (o * polar).sum() / (o.norm() * polar.norm())
    assert cosine > 0.95


def _cnn():
    torch.manual_seed(0)
    return create_model("cnn", num_classes=10, in_chans=1)


def test_hidden_weights_skip_the_stem_the_classifier_biases_and_norms():
    net = _cnn()
    convs = [m.weight for m in net.modules() if isinstance(m, nn.Conv2d)]
    got = {id(p) for p in hidden_weights(net)}
    assert got == {id(p) for p in convs[1:]}  # every conv but the stem
    assert all(id(p) not in got for p in net.get_classifier().parameters())


def test_hidden_weights_of_a_timm_network_leave_its_classifier_to_adamw():
    import timm

    net = timm.create_model("resnet18", num_classes=3, pretrained=False)
    got = {id(p) for p in hidden_weights(net)}
    assert id(net.conv1.weight) not in got and id(net.fc.weight) not in got
    assert id(net.layer1[0].conv1.weight) in got and id(net.layer4[1].conv2.weight) in got
    assert len(got) == sum(isinstance(m, nn.Conv2d) for m in net.modules()) - 1


def _grads(net, seed: int):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_adamw_params_step_exactly_as_torch_adamw_and_hidden_ones_at_adamw_rms():
    net = _cnn().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(net)
    lr, wd = 3e-3, 1e-4
    opt = create_optimizer(
        list(net.parameters()), {"optimizer": "muon", "lr": lr, "weight_decay": wd}, net
    )
    hidden = {id(p) for p in hidden_weights(net)}
    names = [n for n, p in net.named_parameters() if id(p) not in hidden]
    ref_params = dict(ref.named_parameters())
    torch_adamw = torch.optim.AdamW([ref_params[n] for n in names], lr=lr, weight_decay=wd)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for step in range(3):
        _grads(net, step)
        _grads(ref, step)
        opt.step()
        torch_adamw.step()
    params = dict(net.named_parameters())
    for n in names:
        torch.testing.assert_close(params[n], ref_params[n])
    opt.zero_grad()
    _grads(net, 9)
    for n, p in net.named_parameters():
        before[n] = p.detach().clone()
    opt.step()
    for n, p in net.named_parameters():
        if id(p) in hidden:
            rms = (p - before[n] * (1 - lr * wd)).pow(2).mean().sqrt().item()
            assert 0.1 * lr < rms < 0.3 * lr, (n, rms)  # Moonshot's 0.2 * lr


def test_state_dict_resumes_the_momentum_of_both_kinds():
    def train(net, opt, seeds):
        for s in seeds:
            opt.zero_grad()
            _grads(net, s)
            opt.step()

    o = {"optimizer": "muon", "lr": 1e-2, "weight_decay": 0.0}
    net = _cnn()
    opt = create_optimizer(list(net.parameters()), o, net)
    train(net, opt, [0, 1])
    saved_net, saved_opt = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    train(net, opt, [2, 3])

    resumed = _cnn()
    resumed.load_state_dict(saved_net)
    opt2 = create_optimizer(list(resumed.parameters()), o, resumed)
    opt2.load_state_dict(saved_opt)
    assert sum("momentum_buffer" in s for s in opt2.state.values()) == len(hidden_weights(resumed))
    train(resumed, opt2, [2, 3])
    for a, b in zip(net.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_groups_added_later_step_with_adamw():
    net = _cnn()
    extra = nn.Parameter(torch.zeros(4, 4))
    opt = MuonAdamW(list(net.parameters()), lr=1e-2, weight_decay=0.0, net=net)
    opt.add_param_group({"params": [extra]})  # as fine-tuning does when it unfreezes a backbone
    assert opt.param_groups[-1]["muon"] is False
    extra.grad = torch.ones(4, 4)
    opt.step()
    assert "exp_avg" in opt.state[extra] and "momentum_buffer" not in opt.state[extra]


def test_lr_scale_multiplies_the_muon_step_and_leaves_adamw_alone():
    nets = [_cnn(), _cnn()]
    opts = [
        create_optimizer(
            list(n.parameters()),
            {"optimizer": "muon", "lr": 1e-2, "weight_decay": 0.0, "muon_lr_scale": s},
            n,
        )
        for n, s in zip(nets, (1.0, 3.0), strict=True)
    ]
    before = {n: p.detach().clone() for n, p in nets[0].named_parameters()}
    for net, opt in zip(nets, opts, strict=True):
        _grads(net, 0)
        opt.step()
    hidden = {id(p) for p in hidden_weights(nets[0])}
    for (n, a), b in zip(nets[0].named_parameters(), nets[1].parameters(), strict=True):
        if id(a) in hidden:
            torch.testing.assert_close(b - before[n], 3 * (a - before[n]))
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("warmup", [0.25, 0.999])
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 8, 400])
def test_onecycle_runs_whole_at_any_number_of_steps(total, warmup):
    """OneCycleLR divided by zero when warmup x steps == 1: 4 steps at the default warm-up (a
    500-image folder with train.epochs=1 crashed), and on the last step of a warm-up of 1. Every
    step, and the step after the last, now gets a finite rate, rising to the peak and falling
    after it."""
    from image_classifier.models.optim import create_scheduler

    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = create_scheduler(
        opt, {"scheduler": "onecycle", "lr": 0.1, "warmup": warmup}, lambda: total
    )
    rates = []
    for _ in range(max(2, total)):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched["scheduler"].step()
    assert all(0 < r <= 0.1 + 1e-12 for r in rates)
    peak = rates.index(max(rates))
    assert rates[: peak + 1] == sorted(rates[: peak + 1]) and rates[peak:] == sorted(
        rates[peak:], reverse=True
    )
