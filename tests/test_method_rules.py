"""Each method owns its rules (mlbreg.methods), the registries fail with the valid names, and a
config is validated once however many callers ask."""

import pytest
import torch

import mlbreg.config as config
from mlbreg.checks import ConfigError
from mlbreg.data import DATASETS
from mlbreg.methods import METHODS, build_method, method_class
from mlbreg.models import MODELS, create_model
from mlbreg.registry import Registry

from helpers import make_cfg


def test_an_unknown_method_setting_raises_with_the_valid_ones():
    model = create_model("mlp", 10, (1, 8, 8), hidden=[8])
    with pytest.raises(ValueError, match=r"method rigl has no setting 'deltat'; valid: .*delta_t"):
        build_method("rigl", model, lr=0.1, total_steps=10, deltat=5)
    method = build_method("rigl", model, lr=0.1, total_steps=10, delta_t=5)
    assert method.rigl.delta_t == 5


def test_a_runs_settings_are_exactly_its_config():
    cfg = make_cfg("method=mllinbreg", "lam=0.2", "m=7", "method.kappa=0.3", "lr=0.05")
    s = method_class("mllinbreg").settings_from(cfg, steps_per_epoch=3)
    assert (s.lam, s.m, s.kappa, s.lr, s.reg) == (0.2, 7, 0.3, 0.05, "l1")
    # every key of the method's group is a setting: a group key without a field would raise
    for name in METHODS:
        group = make_cfg(f"method={name}", "sparsity=0.9").method
        fields = set(method_class(name).Settings.__dataclass_fields__)
        assert set(group) - {"name"} <= fields, name


def test_registries_name_the_valid_choices():
    for registry, kind in ((METHODS, "method"), (MODELS, "model"), (DATASETS, "dataset")):
        with pytest.raises(ValueError, match=rf"unknown {kind} 'nope'; valid: "):
            registry.get("nope")
    reg = Registry("thing")
    reg.register("a", 1)

    @reg.register("b")
    def b():
        return 2

    assert reg.names() == ("a", "b") and "b" in reg and reg.get("b") is b
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 3)


def test_method_facts_come_from_the_class():
    assert [n for n in METHODS if method_class(n).has_coarse_steps] == ["mllinbreg"]
    assert [n for n in METHODS if method_class(n).needs_sparsity] == ["rigl", "prune_finetune", "set", "static", "gmp"]
    cfg = make_cfg("method=rigl", "sparsity=0.8", "init.density=0.3")
    assert method_class("rigl").init_density(cfg) == pytest.approx(0.2)  # 1 - target, not init.density
    for name in ("set", "static"):  # RigL's init policy
        assert method_class(name).init_density(make_cfg(f"method={name}", "sparsity=0.8")) == pytest.approx(0.2)
    assert method_class("sgd").init_density(make_cfg("method=sgd")) == 1.0
    assert method_class("gmp").init_density(make_cfg("method=gmp", "sparsity=0.8")) == 1.0  # a dense start
    assert method_class("rigl").name_parts(cfg) == ["sp0.8", "uniform"]
    with pytest.raises(ConfigError, match=r"invalid method.alpha=2: must be in \[0, 1\] \(the initial drop"):
        config.validate(make_cfg("method=rigl", "sparsity=0.8", "method.alpha=2"))


def test_a_config_is_validated_once(monkeypatch):
    calls = []
    real = config._check_keys
    monkeypatch.setattr(config, "_check_keys", lambda cfg: (calls.append(1), real(cfg)))
    cfg = make_cfg("lam=0.123", "seed=41")
    config.validate(cfg)
    config.validate(cfg)
    config.validate(make_cfg("lam=0.123", "seed=41"))  # the same content composed again
    assert len(calls) == 1
    config.validate(cfg, environment=False)  # another check: runs
    assert len(calls) == 2
    bad = make_cfg("lam=0.123", "seed=41", "lr=-1")
    for _ in range(2):  # a bad config is never remembered
        with pytest.raises(ConfigError, match="invalid lr=-1"):
            config.validate(bad)


def test_sgd_is_torch_sgd_with_the_cifar_recipe():
    model = create_model("mlp", 10, (1, 8, 8), hidden=[8])
    method = build_method("sgd", model, lr=0.1)
    assert isinstance(method.optimizer, torch.optim.SGD) and method.step_kind() == "dense"
    group = method.optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["dampening"]) == (0.9, 5e-4, 0.0)
