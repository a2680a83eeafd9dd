"""Fusion by graph: conv -> BatchNorm2d -> [residual add] -> ReLU patterns found in any model's torch.fx graph.

``plan_fusions(model)`` traces the model with ``torch.fx.symbolic_trace`` (standard torch.nn layers and
modules with hooks stay calls; everything else is traced through: mlbreg's and torchvision's ResNet blocks,
VGG's nn.Sequential, a user's own blocks) and rewrites every chain

    conv -> BatchNorm2d -> ReLU                  (a plain nn.Conv2d, nn.BatchNorm2d, nn.ReLU / F.relu / relu_)
    conv -> BatchNorm2d -> add(·, res) -> ReLU   (operator.add, +=, torch.add, Tensor.add / add_)
    conv -> BatchNorm2d -> add(·, res)           (an add that no ReLU follows)

whose intermediate results have no other use into one call of the backend's ``bn_act(bn, x, res, relu)``
(``relu``: the ReLU module, True for a functional ReLU, False for none)
(native fused BatchNorm + add + ReLU on the CHWB layout; torch's ops on any other input). The rewritten
``GraphModule`` shares the model's submodules and parameters; the backend installs its ``forward`` as the
traced module's instance ``forward`` during coarse steps only, so the module tree and ``state_dict`` never
change. A model that cannot be traced (data-dependent control flow, unsupported Python) falls back to its
largest traceable submodules, each traced alone; what is left runs per-layer swaps, with the reason in
``notes``. Also here: the pooling layers that keep the CHWB layout (``pool_forward``) and the summary rows of
all this (``summary_rows``). The graph is traced once, in the mode the model is in (call it in training mode: a forward that
branches on ``self.training`` keeps the branch it traced).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..swap_layer import Plain
from .ops import is_chwb, pool_chwb

__all__ = ["POOLS", "Fusion", "GraphPlan", "plan_fusions", "pool_forward", "pool_reason", "summary_rows"]

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclass
class Fusion:
    """One fused chain: the BatchNorm2d's name in the model, its conv, and what follows it."""

    bn: str
    conv: str
    res: bool
    relu: bool
    root: str  # the traced module it lives in ("" = the model)

    @property
    def pattern(self) -> str:
        return "conv -> bn" + (" -> add" if self.res else "") + (" -> relu" if self.relu else "")


@dataclass
class GraphPlan:
    """The traced modules (name, module, rewritten GraphModule) that hold at least one fusion, every fusion,
    and (module name, reason) for each module that was not traced."""

    roots: list = field(default_factory=list)
    fusions: list = field(default_factory=list)
    notes: list = field(default_factory=list)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping modules with forward hooks as calls (their hooks must still run)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return bool(m._forward_hooks or m._forward_pre_hooks) or super().is_leaf_module(m, qualname)


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def _module(node, modules, cls, hooks_ok: bool = False):
    """The module a call_module node calls if it is exactly `cls` (and has no hooks, unless `hooks_ok`:
    a fused BatchNorm or ReLU is not called as a module, so its hooks would not run)."""
    if node.op != "call_module":
        return None
    mod = modules.get(node.target)
    return mod if type(mod) is cls and (hooks_ok or not _hooked(mod)) else None


def _is_relu(node, modules) -> bool:
    if _module(node, modules, nn.ReLU) is not None:
        return True
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def _residual(node, bn):
    """The other operand if `node` adds `bn`'s output to a tensor (no alpha, no out=), else None. An in-place
    add must write into bn's output (``out += res``), not into the residual."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    if not (
        (node.op == "call_function" and node.target in _ADD_FUNCTIONS)
        or (node.op == "call_method" and node.target in ("add", "add_"))
    ):
        return None
    a, b = node.args
    if node.target in (operator.iadd, "add_") and a is not bn:
        return None
    if a is bn and b is not bn:
        return b
    return a if b is bn else None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rewrite(gm: fx.GraphModule, bn_act, root: str) -> list[Fusion]:
    """Replace every fusable chain of `gm`'s graph by one ``bn_act`` call; the fusions made."""
    modules = dict(gm.named_modules())
    graph, fusions = gm.graph, []
    for node in list(graph.nodes):
        if _module(node, modules, nn.BatchNorm2d) is None or len(node.args) != 1 or node.kwargs:
            continue
        conv = node.args[0]
        if not isinstance(conv, fx.Node) or _module(conv, modules, nn.Conv2d, hooks_ok=True) is None:
            continue
        user = _only_user(node)
        if user is None:
            continue
        res = _residual(user, node)
        add = user if res is not None else None
        tail = _only_user(add) if add is not None else user
        relu = tail is not None and _is_relu(tail, modules)
        if not relu and add is None:
            continue
        end = tail if relu else add
        with graph.inserting_before(end):
            act = graph.get_attr(end.target) if relu and end.op == "call_module" else relu
            fused = graph.call_function(bn_act, (graph.get_attr(node.target), conv, res, act))
        end.replace_all_uses_with(fused)
        for dead in dict.fromkeys((end, add, node)):  # end may be the add
            if dead is not None and not dead.users:
                graph.erase_node(dead)
        prefix = f"{root}." if root else ""
        fusions.append(Fusion(prefix + node.target, prefix + conv.target, res is not None, relu, root))
    graph.lint()
    gm.recompile()
    return fusions


def _trace(mod: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    graph = tracer.trace(mod)
    return fx.GraphModule(tracer.root, graph, type(mod).__name__)


def plan_fusions(model: nn.Module, bn_act) -> GraphPlan:
    """Trace `model` (or, where it fails, its largest traceable submodules) and rewrite its fusable chains
    into calls of ``bn_act(bn, x, res, relu)``. See the module docstring."""
    plan = GraphPlan()
    _plan(model, "", bn_act, plan, fx.Tracer())
    return plan


def _plan(mod: nn.Module, name: str, bn_act, plan: GraphPlan, plain: fx.Tracer) -> None:
    # a standard torch.nn layer has nothing to fuse; a module whose forward someone replaced is left alone
    # (the traced module's own hooks still run: its instance forward is called through nn.Module.__call__)
    if plain.is_leaf_module(mod, name) or not isinstance(mod.__dict__.get("forward", Plain()), Plain):
        return
    try:
        gm = _trace(mod)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: try the submodules
        plan.notes.append(
            (
                name or "(model)",
                f"not traceable by torch.fx ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:160] if str(err) else ''}); "
                "its submodules are traced alone",
            )
        )
        for child, sub in mod.named_children():
            _plan(sub, f"{name}.{child}" if name else child, bn_act, plan, plain)
        return
    fusions = _rewrite(gm, bn_act, name)
    if fusions:
        plan.roots.append((name, mod, gm))
        plan.fusions += fusions


POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def pool_reason(pool: nn.Module) -> str | None:
    return "return_indices=True" if getattr(pool, "return_indices", False) else None


def pool_forward(pool: nn.Module):
    """Pooling that keeps a CHWB input in the CHWB layout (ops.pool_chwb); any other input: the module's own."""
    dense_forward = type(pool).forward

    def forward(x):
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and is_chwb(x):
            return pool_chwb(dense_forward, pool, x)
        return dense_forward(pool, x)

    return forward


def summary_rows(model: nn.Module, plan: GraphPlan, pools: list, pool_kinds: tuple, native: set) -> list[dict]:
    """What the native backend does beyond the prunable layers, one row each (layer, kind, choice, why): the
    modules torch.fx could not trace, every BatchNorm2d (fused with what, native alone, or torch's and why) and
    every pooling layer. `native`: the names of the layers that run native now."""
    rows = [dict(layer=name, kind="graph", choice="not traced", why=why) for name, why in plan.notes]
    fused = {f.bn: f for f in plan.fusions}
    native_pools = {id(p) for p in pools}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            f = fused.get(name)
            if type(mod) is not nn.BatchNorm2d:
                row = dict(choice="dense", why=f"{type(mod).__name__} is not a plain nn.BatchNorm2d")
            elif f is not None and f.conv not in native:
                row = dict(choice="dense", why=f"{f.pattern}: its conv {f.conv} runs dense, so torch's ops run")
            elif f is not None:
                row = dict(choice="native fused", why=f"{f.pattern}")
            else:
                row = dict(choice="native", why="alone (no fusable chain through it), on a native layer's output")
            rows.append(dict(layer=name, kind="batchnorm", **row))
        elif isinstance(mod, pool_kinds):
            row = (
                dict(choice="CHWB layout", why="pools the batch-innermost layout in place")
                if id(mod) in native_pools
                else dict(
                    choice="dense",
                    why="return_indices=True"
                    if getattr(mod, "return_indices", False)
                    else f"{type(mod).__name__}: not a plain torch pooling layer",
                )
            )
            rows.append(dict(layer=name, kind="pool", **row))
    return rows
