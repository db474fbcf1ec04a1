"""paramd.torch: translating torch optimizers, and the arguments refused
before any call to a server (the URL points at a closed port)."""

import pytest

import paramd

torch = pytest.importorskip("torch")
import paramd.torch as pt  # noqa: E402

NOWHERE = "http://127.0.0.1:1"


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def split(m):
    return [m[0].weight, m[0].bias], [m[2].weight, m[2].bias]


def test_adamw_with_groups_is_translated_with_every_hyperparameter():
    m = model()
    body, head = split(m)
    opt = torch.optim.AdamW(
        [{"params": body, "lr": 1e-5}, {"params": head, "betas": (0.8, 0.9), "amsgrad": True}],
        lr=1e-3,
        weight_decay=0.02,
        eps=1e-7,
    )
    base, groups = pt.translate(opt)
    assert base == paramd.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-7, weight_decay=0.02, amsgrad=False)
    assert groups[0][0] == body and groups[0][1]["lr"] == 1e-5 and groups[0][1]["weight_decay"] == 0.02
    assert groups[1][1]["betas"] == (0.8, 0.9) and groups[1][1]["amsgrad"] is True
    assert groups[1][1]["lr"] == 1e-3


def test_sgd_and_adam_are_translated():
    m = model()
    base, groups = pt.translate(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    assert isinstance(base, paramd.SGD) and base.hyper["momentum"] == 0.9 and base.hyper["nesterov"] is True
    base, _ = pt.translate(torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01), weight_decay=0.1))
    assert type(base) is paramd.Adam and base.hyper["lr"] == pytest.approx(0.01) and base.hyper["weight_decay"] == 0.1
    base, _ = pt.translate(torch.optim.AdamW(m.parameters(), maximize=True))
    assert base.hyper["maximize"] is True and base.to_pb().hyper.maximize
    # Adam with decoupled weight decay is AdamW.
    base, _ = pt.translate(torch.optim.Adam(m.parameters(), decoupled_weight_decay=True, weight_decay=0.1))
    assert type(base) is paramd.AdamW


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda ps: torch.optim.RMSprop(ps),
            r"torch\.optim\.rmsprop\.RMSprop cannot run on paramd: only torch\.optim\.SGD",
        ),
        (lambda ps: torch.optim.Adagrad(ps), r"Adagrad cannot run"),
    ],
)
def test_other_optimizers_and_options_are_refused(make, match):
    with pytest.raises(paramd.InvalidArgument, match=match):
        pt.translate(make(model().parameters()))


def test_an_attached_lr_scheduler_is_refused():
    opt = torch.optim.AdamW(model().parameters())
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(paramd.InvalidArgument, match=r"LR scheduler is attached.*schedule=paramd\.WarmupCosine"):
        pt.translate(opt)


def test_an_optimizer_that_has_stepped_is_refused():
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    with pytest.raises(paramd.InvalidArgument, match="has optimizer state already"):
        pt.translate(opt)


def test_a_subclass_is_not_taken_for_its_base():
    class MyAdamW(torch.optim.AdamW):
        pass

    with pytest.raises(paramd.InvalidArgument, match="MyAdamW cannot run on paramd"):
        pt.translate(MyAdamW(model().parameters()))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"optimizer": None}, "optimizer is required"),
        ({"optimizer": "adamw"}, "optimizer must be paramd.SGD, paramd.Adam or paramd.AdamW"),
        ({"job": ""}, "job must be a non-empty string"),
        ({"rank": 4, "world_size": 4}, r"rank must be in \[0, world_size\): got rank 4, world_size 4"),
        ({"server": None}, "server is required"),
        ({"param_groups": [{"lr": 0.1}]}, r"param_groups\[0\] must be a dict with 'params'"),
        (
            {"param_groups": [{"params": [torch.zeros(2)]}]},
            r"param_groups\[0\] holds a tensor that is not in named_parameters",
        ),
        (
            {"param_groups": [{"params": ["0.weight"], "lr": 0.1}]},
            r"'0.bias', '2.weight', '2.bias' are in no param group",
        ),
        (
            {"param_groups": [{"params": ["0.weight", "0.bias", "2.weight", "2.bias"], "nesterov": True}]},
            "nesterov is not an option of AdamW",
        ),
        ({"schedule": paramd.AdamW()}, "schedule must be"),
    ],
)
def test_remote_optimizer_arguments_are_refused_before_any_call(kwargs, match):
    m = model()
    args = dict(server=NOWHERE, job="j", rank=0, world_size=1, optimizer=paramd.AdamW())
    args.update(kwargs)
    with pytest.raises(paramd.InvalidArgument, match=match):
        pt.RemoteOptimizer(m.named_parameters(), **args)


def test_a_torch_optimizer_given_to_remote_optimizer_points_to_the_wrapper():
    m = model()
    with pytest.raises(paramd.InvalidArgument, match="wrap it with paramd.torch.DistributedOptimizer"):
        pt.RemoteOptimizer(m.named_parameters(), server=NOWHERE, job="j", optimizer=torch.optim.SGD(m.parameters()))


def test_non_float32_parameters_are_refused():
    m = model().double()
    with pytest.raises(paramd.InvalidArgument, match=r"parameter '0.weight' is torch.float64: paramd trains float32"):
        pt.RemoteOptimizer(m.named_parameters(), server=NOWHERE, job="j", optimizer=paramd.SGD())


def test_distributed_optimizer_needs_names_for_every_trained_tensor():
    m = model()
    stray = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD(list(m.parameters()) + [stray], lr=0.1)
    with pytest.raises(paramd.InvalidArgument, match=r"holds a tensor of shape \(2,\) that is not in named_parameters"):
        pt.DistributedOptimizer(opt, named_parameters=m.named_parameters(), server=NOWHERE, job="j")
    with pytest.raises(paramd.InvalidArgument, match="named_parameters is required"):
        pt.DistributedOptimizer(torch.optim.SGD(m.parameters()), server=NOWHERE, job="j")
    with pytest.raises(paramd.InvalidArgument, match="optimizer must be a torch.optim optimizer"):
        pt.DistributedOptimizer(paramd.AdamW(), named_parameters=m.named_parameters(), server=NOWHERE, job="j")


def test_rank_and_world_size_come_from_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert pt._rank_and_world(None, None) == (2, 3)
    assert pt._rank_and_world(0, None) == (0, 3)


def test_job_options_are_one_set_of_keywords_for_both_optimizers():
    m = model()
    options = paramd.JobOptions(server=NOWHERE, job="j", rank=0, world_size=1)
    # Keywords given beside options= override its fields.
    with pytest.raises(paramd.InvalidArgument, match="job must be a non-empty string"):
        pt.RemoteOptimizer(m.named_parameters(), optimizer=paramd.SGD(), options=options, job="")
    with pytest.raises(paramd.InvalidArgument, match="job must be a non-empty string"):
        pt.DistributedOptimizer(
            torch.optim.SGD(m.parameters()), named_parameters=m.named_parameters(), options=options, job=""
        )
    for make in (
        lambda: pt.RemoteOptimizer(m.named_parameters(), optimizer=paramd.SGD(), options=options, jobb="j"),
        lambda: pt.DistributedOptimizer(torch.optim.SGD(m.parameters()), m.named_parameters(), jobb="j"),
    ):
        with pytest.raises(TypeError, match="unexpected keyword argument 'jobb'"):
            make()
    with pytest.raises(TypeError, match="options must be paramd.JobOptions"):
        pt.RemoteOptimizer(m.named_parameters(), optimizer=paramd.SGD(), options={"job": "j"})
