"""Argument validation of optimizers, schedules, clipping and job specs,
without a server."""

import math
import subprocess
import sys

import pytest

import paramd
from paramd.config import job_spec
from paramd.v1 import paramd_pb2 as pb

PARAMS = [("enc.weight", (4, 3)), ("enc.bias", (4,)), ("head", ())]


def test_the_package_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import paramd\n"
        "assert paramd.Client and paramd.AdamW\n"
        "try:\n"
        "    import paramd.torch\n"
        "except ImportError:\n"
        "    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_defaults_are_torchs():
    assert paramd.AdamW().hyper == {
        "lr": 1e-3,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.01,
        "amsgrad": False,
        "maximize": False,
    }
    assert paramd.Adam().hyper["weight_decay"] == 0.0
    assert paramd.SGD().hyper == {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: paramd.AdamW(lr=-1), r"AdamW\.lr must be >= 0, got -1"),
        (lambda: paramd.Adam(betas=(0.9, 1.0)), r"Adam\.betas\[1\] must be in \[0, 1\), got 1"),
        (lambda: paramd.Adam(betas=0.9), r"Adam\.betas must be a pair"),
        (lambda: paramd.AdamW(eps=-1e-8), r"AdamW\.eps must be >= 0"),
        (lambda: paramd.AdamW(lr=float("nan")), r"AdamW\.lr must be finite"),
        (lambda: paramd.AdamW(amsgrad=1), r"AdamW\.amsgrad must be True or False"),
        (lambda: paramd.SGD(momentum=-0.1), r"SGD\.momentum must be >= 0"),
        (lambda: paramd.SGD(lr=0.1, nesterov=True), r"SGD\.nesterov requires momentum > 0 and dampening 0"),
        (lambda: paramd.SGD(momentum=0.9, dampening=0.1, nesterov=True), r"nesterov requires"),
        (lambda: paramd.SGD(lr="fast"), r"SGD\.lr must be a number, got 'fast'"),
        (lambda: paramd.WarmupCosine(warmup_steps=10, total_steps=5), r"warmup_steps \(10\) must not exceed"),
        (lambda: paramd.WarmupCosine(1, 5, min_lr_ratio=2), r"min_lr_ratio must be in \[0, 1\], got 2"),
        (lambda: paramd.WarmupCosine(-1, 5), r"warmup_steps must be an integer >= 0, got -1"),
        (lambda: paramd.CosineAnnealing(0), r"t_max must be > 0"),
        (lambda: paramd.ClipGradNorm(0), r"clip\.max_norm must be > 0, got 0"),
        (lambda: paramd.ClipGradNorm(1.0, norm_type=1), r"norm_type 1 is not supported"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_field_and_value(make, match):
    with pytest.raises(paramd.InvalidArgument, match=match) as e:
        make()
    assert isinstance(e.value, ValueError)


def test_options_an_optimizer_does_not_have_are_refused():
    with pytest.raises(TypeError):
        paramd.Adam(momentum=0.9)
    spec = dict(optimizer=paramd.AdamW(), workers=1)
    with pytest.raises(paramd.InvalidArgument, match=r"param_groups\[0\]: momentum is not an option of AdamW"):
        job_spec(PARAMS, param_groups=[{"params": ["enc.weight", "enc.bias", "head"], "momentum": 0.9}], **spec)


@pytest.mark.parametrize(
    "groups,match",
    [
        ([{"params": ["enc.weight"]}], r"parameters 'enc.bias', 'head' are in no param group"),
        (
            [{"params": ["enc.weight", "enc.bias"]}, {"params": ["enc.bias", "head"]}],
            r"parameter 'enc.bias' is in param_groups\[0\] and param_groups\[1\]",
        ),
        ([{"params": ["nope", "enc.weight", "enc.bias", "head"]}], r"names parameter 'nope'"),
        ([{"lr": 0.1}], r"param_groups\[0\] has no 'params'"),
        ([{"params": ["enc.weight", "enc.bias", "head"], "lr": -2}], r"param_groups\[0\]\.lr must be >= 0, got -2"),
    ],
)
def test_param_groups_must_cover_every_parameter_once(groups, match):
    with pytest.raises(paramd.InvalidArgument, match=match):
        job_spec(PARAMS, paramd.AdamW(), 2, param_groups=groups)


def test_job_arguments_are_checked():
    with pytest.raises(paramd.InvalidArgument, match="workers must be an integer >= 1, got 0"):
        job_spec(PARAMS, paramd.AdamW(), 0)
    with pytest.raises(paramd.InvalidArgument, match="optimizer must be paramd.SGD"):
        job_spec(PARAMS, "adamw", 1)
    with pytest.raises(paramd.InvalidArgument, match="schedule must be"):
        job_spec(PARAMS, paramd.AdamW(), 1, schedule="cosine")
    with pytest.raises(paramd.InvalidArgument, match="non_finite must be 'skip' or 'error'"):
        job_spec(PARAMS, paramd.AdamW(), 1, non_finite="ignore")
    with pytest.raises(paramd.InvalidArgument, match="listed twice"):
        job_spec(PARAMS + [("head", ())], paramd.AdamW(), 1)


def test_the_spec_carries_every_hyperparameter_and_group():
    spec = job_spec(
        PARAMS,
        paramd.AdamW(lr=1e-3, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True),
        4,
        param_groups=[
            {"params": ["enc.weight", "enc.bias"], "lr": 1e-4},
            {"params": ["head"], "weight_decay": 0.0, "betas": (0.5, 0.6)},
        ],
        schedule=paramd.WarmupCosine(warmup_steps=3, total_steps=12, min_lr_ratio=0.1),
        clip=paramd.ClipGradNorm(max_norm=1.0),
        non_finite="error",
        worker_timeout=30,
        backup_workers=1,
    )
    assert [(p.name, list(p.shape)) for p in spec.params] == [("enc.weight", [4, 3]), ("enc.bias", [4]), ("head", [])]
    assert spec.optimizer.kind == pb.OPTIMIZER_KIND_ADAMW
    h = spec.optimizer.hyper
    assert (h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.amsgrad) == (1e-3, 0.8, 0.99, 1e-8, 0.05, True)
    assert not h.HasField("momentum")
    g0, g1 = spec.param_groups
    assert list(g0.params) == ["enc.weight", "enc.bias"] and g0.hyper.lr == 1e-4
    assert not g0.hyper.HasField("weight_decay")
    assert (
        list(g1.params) == ["head"] and g1.hyper.weight_decay == 0.0 and (g1.hyper.beta1, g1.hyper.beta2) == (0.5, 0.6)
    )
    assert spec.schedule.warmup_cosine == pb.WarmupCosine(warmup_steps=3, total_steps=12, min_lr_ratio=0.1)
    assert spec.clip.max_norm == 1.0
    assert spec.workers == 4 and spec.backup_workers == 1 and spec.worker_timeout_seconds == 30
    assert spec.non_finite == pb.NON_FINITE_POLICY_ERROR


def test_schedules_follow_the_golden_formulas():
    s = paramd.WarmupCosine(warmup_steps=3, total_steps=12, min_lr_ratio=0.1)
    assert [s.factor(t) for t in range(3)] == [0.0, 1 / 3, 2 / 3]
    assert s.factor(3) == pytest.approx(1.0)
    p = (7 - 3) / 9
    assert s.factor(7) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    assert s.factor(12) == pytest.approx(0.1) and s.factor(50) == pytest.approx(0.1)
    c = paramd.CosineAnnealing(t_max=4, eta_min=0.01)
    assert c.lr(0.1, 4) == pytest.approx(0.01) and c.lr(0.1, 8) == pytest.approx(0.1)
