r"""LinBreg and ML LinBreg optimizers (docs/algorithms.md §2 and §3).

LinBreg (linearized Bregman iterations, Bungert et al. 2022) is mirror descent with the
elastic net J_δ(θ) = J(θ) + ‖θ‖²/(2δ). Per tensor it keeps the dual variable v:

    v₀ = θ₀/δ + p(θ₀),  p ∈ ∂J(θ₀)           (lazily, at the first step; prox(δv₀) = θ₀)
    b ← β·b + (1 − d)·g                      (b = g on the first step, as torch.optim.SGD)
    v ← v − τ·b
    θ ← prox_{δJ}(δ·v) = δ·shrink(v, λ)

A coordinate is non-zero only while |v| > λ, so the optimizer itself prunes and regrows.
Param groups whose `reg` is "none" are plain SGD (δ = 1, J = 0: v ≡ θ, so no v is kept).

ML LinBreg (the paper's method) runs cycles of period m: a *fine* step (a full LinBreg
step, after which the support S = {θ ≠ 0} of every regularized tensor is fixed) followed by
m − 1 *coarse* steps restricted to S: b and v change on S only, θ outside S stays 0, and
the state outside S is left untouched. m = 1 is exactly LinBreg.

Both optimizers follow torch.optim.SGD's shape: lazy state, a functional core with a
per-tensor loop and a multi-tensor `torch._foreach_*` path behind one signature, in-place
updates only, and only plain numbers and strings in param groups so `state_dict()` works.
The multi-tensor path can also run through `torch.compile` (`compiled=`), which fuses
its kernels: the same function, traced, with the learning rate as a 0-d tensor.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from .regularizers import check_regularizer, subgradient, support
from .update import linbreg_update

__all__ = ["LinBreg", "MLLinBreg", "MOMENTUM_STYLES"]

MOMENTUM_STYLES = ("torch", "reference")


class LinBreg(Optimizer):
    """Linearized Bregman iterations (see the module docstring for the math).

    Args:
        params: parameters or param groups. Each group may set `reg` ("l1", "group",
            "l1_group" or "none"), `lam`, `delta` and the usual SGD keys.
        lr: learning rate τ.
        lam: regularization strength λ ≥ 0.
        reg: regularizer of the groups that do not set one (default "l1").
        delta: elastic-net parameter δ > 0 (ignored for reg="none", where δ = 1).
        momentum, dampening, weight_decay: as in torch.optim.SGD (b = g on the first
            step; mlbreg's configs choose dampening, see docs/method.md).
        momentum_style: "torch" (the default): b ← β·b + (1 − d)·g with b = g on the
            first step, v ← v − τ·b, as torch.optim.SGD; "reference": the LinBreg
            reference's (BregmanLearning `optimizers.LinBreg`) b ← β·b + (1 − β)·τ·g from
            b = 0, v ← v − b, so τ sits inside the buffer (under a schedule, a step's b
            mixes earlier learning rates) and at β = 0.9 a step moves v 10x less than
            "torch" with d = 0. `dampening` must be 0 with "reference".
        foreach: use the multi-tensor path (default: True for CUDA tensors, like torch).
        compiled: run the multi-tensor update through `torch.compile`, which fuses its
            ~7 multi-tensor kernels into a few that read g, b, v (and S) once and write
            b, v, θ once. True: always (errors propagate); False: never (the default);
            None: on CUDA tensors when Triton is installed, falling back to the eager
            update with a warning if compilation fails. The first compiled steps take
            seconds (compilation); the results equal the eager update's to fp32 rounding.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        lam: float = 0.0,
        reg: str = "l1",
        delta: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        compiled: bool | None = False,
        momentum_style: str = "torch",
    ):
        if momentum_style not in MOMENTUM_STYLES:
            raise ValueError(f"unknown momentum_style {momentum_style!r}; valid: {', '.join(MOMENTUM_STYLES)}")
        if momentum_style == "reference" and dampening != 0:
            raise ValueError(
                f"dampening={dampening} has no meaning with momentum_style='reference' "
                "(its buffer is b ← β·b + (1 − β)·τ·g); use dampening=0"
            )
        if lr < 0:
            raise ValueError(f"invalid learning rate lr={lr}; must be >= 0")
        if lam < 0:
            raise ValueError(f"invalid lam={lam}; must be >= 0")
        if delta <= 0:
            raise ValueError(f"invalid delta={delta}; must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"invalid momentum={momentum}; must be in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay={weight_decay}; must be >= 0")
        check_regularizer(reg)
        defaults = dict(
            lr=lr,
            lam=lam,
            reg=reg,
            delta=delta,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            foreach=foreach,
            momentum_style=momentum_style,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_regularizer(group["reg"])
            if group["lam"] < 0:
                raise ValueError(f"invalid lam={group['lam']} in a param group; must be >= 0")
        if compiled not in (True, False, None):
            raise ValueError(f"invalid compiled={compiled!r}; valid: True, False, None (auto)")
        self.compiled = compiled
        self._compiled_update = None  # this optimizer's torch.compile'd linbreg_update
        self._lr_tensors: dict = {}  # per group: τ as a 0-d tensor on the parameters' device

    # -- state ---------------------------------------------------------------------------
    def _group_tensors(self, group):
        """Tensors of one group that have a gradient, with their (lazily created) state."""
        params, grads, duals, bufs = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("LinBreg does not support sparse gradients")
            state = self.state[p]
            if group["reg"] != "none" and "v" not in state:
                # v₀ = θ₀/δ + p(θ₀): the prox of δ·v₀ gives back θ₀ exactly
                state["v"] = (p.detach() / group["delta"]).add_(subgradient(p.detach(), group["reg"], group["lam"]))
            params.append(p)
            grads.append(p.grad)
            duals.append(state.get("v"))
            bufs.append(state.get("momentum_buffer"))
        return params, grads, duals, bufs

    def _use_foreach(self, group, params) -> bool:
        if group["foreach"] is not None:
            return bool(group["foreach"])
        return bool(params) and all(p.is_cuda for p in params)

    # -- the compiled update -------------------------------------------------------------
    def _use_compiled(self, group, params, bufs) -> bool:
        if not params or self.compiled is False or group["foreach"] is False:
            return False
        if group["momentum"] != 0 and any(b is None for b in bufs):
            return False  # the first step creates the buffers (b = g): eager, once
        if self.compiled is None:
            from torch.utils._triton import has_triton

            return params[0].is_cuda and has_triton()
        return True

    def _compiled(self):
        if self._compiled_update is None:
            # A private copy of the function's code object gives this optimizer its own
            # dynamo cache: a process that builds many optimizers (a Hydra sweep run in
            # one process, the tests) never exhausts the shared recompile limit.
            fn = types.FunctionType(
                linbreg_update.__code__.replace(),
                linbreg_update.__globals__,
                "linbreg_update",
                linbreg_update.__defaults__,
                linbreg_update.__closure__,
            )
            fn.__kwdefaults__ = linbreg_update.__kwdefaults__
            self._compiled_update = torch.compile(fn, fullgraph=True, dynamic=False)
        return self._compiled_update

    def _lr_tensor(self, group, device) -> torch.Tensor:
        key = (id(group), device)
        if key not in self._lr_tensors:
            self._lr_tensors[key] = torch.zeros((), dtype=torch.float32, device=device)
        return self._lr_tensors[key].fill_(group["lr"])  # no host sync: a fill kernel

    def _step_group(self, group, masks_for: Callable | None = None, refresh_support: bool = False) -> None:
        """One update of `group`: restricted to `masks_for(params)` if given; with
        `refresh_support`, state[p]["support"] is set to the new support afterwards."""
        params, grads, duals, bufs = self._group_tensors(group)
        masks = masks_for(params) if masks_for is not None else None
        support_out = None
        if refresh_support and group["reg"] in ("l1", "l1_group"):
            # elementwise support: the update writes it in place (created at the first fine step)
            for p in params:
                if "support" not in self.state[p]:
                    self.state[p]["support"] = torch.empty_like(p, memory_format=torch.preserve_format)
            support_out = [self.state[p]["support"] for p in params]
        settings = dict(
            reg=group["reg"],
            lam=group["lam"],
            delta=group["delta"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            momentum_style=group.get("momentum_style", "torch"),
        )
        done = False
        if self._use_compiled(group, params, bufs):
            lr = self._lr_tensor(group, params[0].device)
            try:
                self._compiled()(params, grads, duals, bufs, masks, support_out, lr=lr, foreach=True, **settings)
                done = True
            except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as err:
                # compilation fails before the graph runs, so nothing was updated yet
                if self.compiled is not None:
                    raise
                warnings.warn(
                    f"compiling the LinBreg update failed ({type(err).__name__}: {err}); "
                    "using the eager multi-tensor update from now on",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.compiled = False
        if not done:
            linbreg_update(
                params,
                grads,
                duals,
                bufs,
                masks,
                support_out,
                lr=group["lr"],
                foreach=self._use_foreach(group, params),
                **settings,
            )
        if refresh_support and support_out is None and group["reg"] != "none":
            for p in params:
                self.state[p]["support"] = support(p.detach(), group["reg"])
        if group["momentum"] != 0:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss


class MLLinBreg(LinBreg):
    """Multilevel LinBreg: a fine step, then m − 1 coarse steps on the support it leaves.

    Cycle order: a cycle here is fine step first (a full LinBreg step at θ_k, after which
    the support S of θ_{k+1} is fixed), then m − 1 coarse steps restricted to S. The paper's
    Algorithm 1 writes a cycle the other way round (the coarse steps from θ_k on the
    restriction of θ_k, then a fine step); over a run the two alternate the same steps,
    shifted by one fine step at the start and the end. Here the structure a coarse step
    uses always comes from a full-gradient step, and step 0 (a sparse initialization) is
    fine.

    Args (besides LinBreg's):
        m: cycle period (m = 1 is LinBreg).
        criterion: "fixed" (every cycle has m − 1 coarse steps) or "adaptive" (paper eq. 10,
            tested at every fine step k, at θ_k: the coarse steps follow only if
            ‖R_k g_k‖ ≥ κ‖g_k‖ and ‖θ_k − θ_last‖ ≥ ε‖θ_k‖, with g_k = ∇L(θ_k), R_k the
            restriction to the support of θ_k and θ_last the iterate at the last successful
            test; after a failed test the next step is fine and tests again).
        kappa, eps: the adaptive criterion's κ and ε (ML BPGD defaults 0.45 and 1e-3).

    `next_step_is_fine()` tells a training loop whether the next `step()` needs the full
    gradient; the support of each regularized tensor lives in `state[p]["support"]`.
    """

    CRITERIA = ("fixed", "adaptive")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        lam: float = 0.0,
        reg: str = "l1",
        delta: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        m: int = 100,
        criterion: str = "fixed",
        kappa: float = 0.45,
        eps: float = 1e-3,
        foreach: bool | None = None,
        compiled: bool | None = False,
        momentum_style: str = "torch",
    ):
        if int(m) != m or m < 1:
            raise ValueError(f"invalid m={m}; the cycle period must be an integer >= 1")
        if criterion not in self.CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(self.CRITERIA)}")
        super().__init__(
            params,
            lr=lr,
            lam=lam,
            reg=reg,
            delta=delta,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            foreach=foreach,
            compiled=compiled,
            momentum_style=momentum_style,
        )
        self.m = int(m)
        self.criterion = criterion
        self.kappa = kappa
        self.eps = eps
        self.steps_taken = 0  # k
        self.coarse_cycle = True  # does the current cycle take coarse steps?
        self.cycle_start = 0  # the step k of the current cycle's fine step
        self.coarse_cycles_started = 0  # (the adaptive criterion keeps θ_last in state[p]["theta_last"])

    def next_step_is_fine(self) -> bool:
        return not self.coarse_cycle or (self.steps_taken - self.cycle_start) % self.m == 0

    def _support_masks(self, params):
        return [self.state[p]["support"] for p in params]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.next_step_is_fine():
            # eq. 10 is evaluated at θ_k with g = ∇L(θ_k), before this fine step moves θ
            start = self.m > 1 and self._criterion_holds()
            for group in self.param_groups:
                self._step_group(group, refresh_support=True)
            if self.m > 1:
                self.coarse_cycle = start
                if start:
                    self.cycle_start = self.steps_taken
                    self.coarse_cycles_started += 1
        else:
            for group in self.param_groups:
                if group["reg"] == "none":
                    self._step_group(group)  # unregularized tensors are always updated
                else:
                    self._step_group(group, self._support_masks)
        self.steps_taken += 1
        return loss

    def _criterion_holds(self) -> bool:
        """Whether the m − 1 steps after this fine step are coarse: always ("fixed"), or
        paper eq. 10 at θ_k ("adaptive"): ‖R_k g‖ ≥ κ‖g‖ and ‖θ_k − θ_last‖ ≥ ε‖θ_k‖, with
        R_k the restriction to the support of θ_k, g its gradient and θ_last the iterate
        at the last coarse cycle's start. On success θ_last ← θ_k."""
        if self.criterion == "fixed":
            return True
        params, grads, restricted, reg_grads, supports = [], [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                grads.append(p.grad)
                if group["reg"] == "none":
                    restricted.append(p.grad)  # unregularized tensors are always in the coarse model
                else:
                    reg_grads.append(p.grad)
                    supports.append(support(p.detach(), group["reg"]).to(p.grad.dtype))
        if reg_grads:
            restricted += torch._foreach_mul(reg_grads, supports)

        def sq_norm(tensors):
            if not tensors:
                return torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)
            return torch.stack(torch._foreach_norm(tensors)).double().square().sum()

        # θ_last lives per parameter (state[p]["theta_last"]): it follows the parameter's
        # device on load; a tensor that had no gradient at the last cycle start is not compared
        moved = [p for p in params if "theta_last" in self.state[p]]
        sums = [sq_norm(grads), sq_norm(restricted)]
        if moved:
            last = [self.state[p]["theta_last"] for p in moved]
            sums += [sq_norm(torch._foreach_sub(moved, last)), sq_norm(moved)]
        g_sq, rg_sq, *diff = torch.stack(sums).tolist()  # one host sync per test
        moved_enough = not diff or diff[0] ** 0.5 >= self.eps * diff[1] ** 0.5
        start = rg_sq**0.5 >= self.kappa * g_sq**0.5 and moved_enough
        if start:
            for p in params:
                if "theta_last" in self.state[p]:
                    self.state[p]["theta_last"].copy_(p)
                else:
                    self.state[p]["theta_last"] = p.detach().clone()
        return start

    # -- checkpointing: the cycle position is part of the optimizer's state --------------
    def state_dict(self):
        sd = super().state_dict()
        sd["ml_linbreg"] = {
            "steps_taken": self.steps_taken,
            "coarse_cycle": self.coarse_cycle,
            "cycle_start": self.cycle_start,
            "coarse_cycles_started": self.coarse_cycles_started,
            "m": self.m,
            "criterion": self.criterion,
        }
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        ml = state_dict.pop("ml_linbreg", None)
        super().load_state_dict(state_dict)
        if ml is not None:
            self.steps_taken = ml["steps_taken"]
            self.cycle_start = ml["cycle_start"]
            self.coarse_cycle = ml["coarse_cycle"]
            self.coarse_cycles_started = ml["coarse_cycles_started"]
