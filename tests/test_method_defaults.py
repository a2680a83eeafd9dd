"""A method's defaults live in two places a reader may look: its `conf/method/<name>.yaml` and its
`Settings` dataclass. They must agree, key by key, for every registered method."""

import dataclasses

import pytest

from mlbreg.methods import METHODS, method_class

from helpers import make_cfg


@pytest.mark.parametrize("name", list(METHODS))
def test_yaml_defaults_equal_the_settings_defaults(name):
    """Every key of the method's config group is a Settings field whose default (where it has one)
    equals the YAML value."""
    group = make_cfg(f"method={name}", "sparsity=0.9").method
    fields = {f.name: f for f in dataclasses.fields(method_class(name).Settings)}
    differ = {}
    for key, value in group.items():
        if key == "name":
            continue
        assert key in fields, f"{name}.yaml: {key} is not a setting of {method_class(name).__name__}"
        field = fields[key]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if default is not dataclasses.MISSING and default != value:
            differ[key] = (value, default)
    assert not differ, f"{name}: YAML value vs Settings default: {differ}"


def test_every_method_states_its_start():
    """A method starts dense, at its target density or at init.density; a method that starts at its target
    needs one; the starting density follows the policy."""
    cfg = make_cfg("sparsity=0.9", "init.density=0.05")
    starts = {}
    for name in METHODS:
        cls = method_class(name)
        assert cls.start in ("dense", "target", "init_density"), name
        assert cls.start != "target" or cls.needs_sparsity, name
        starts[name] = cls.init_density(cfg)
    assert starts["sgd"] == starts["prune_finetune"] == 1.0
    assert starts["rigl"] == pytest.approx(0.1) and starts["mllinbreg"] == 0.05
