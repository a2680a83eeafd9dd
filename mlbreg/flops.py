"""FLOP accounting for sparse training (the RigL FLOP model).

Only convolutions and linear layers are counted (BN, pooling, activations
and residual additions are negligible and ignored), and a multiply-add is
2 FLOPs, matching ``torch.utils.flop_counter.FlopCounterMode``. Biases are
ignored too, as FlopCounterMode does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .models import prunable_modules


def _layer_flops(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    """Analytic forward FLOPs of one Conv2d/Linear call, per sample."""
    batch = inp.shape[0]
    if isinstance(m, nn.Conv2d):
        # Each output element is a dot product over (C_in / groups) * kh * kw.
        macs_per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        return 2.0 * macs_per_out * out.numel() / batch
    # Linear: one in_features-long dot product per output element; leading
    # dims other than the batch (e.g. tokens) multiply the work.
    return 2.0 * m.in_features * out.numel() / batch


def dense_layer_flops(model: nn.Module, in_shape) -> dict[str, float]:
    """Dense forward FLOPs of one sample, per prunable layer (``prunable_modules`` names).

    Runs one batch-1 forward pass in eval mode with forward hooks recording
    each layer's input/output shapes; the model's train/eval mode is restored
    and no parameter or buffer changes (eval-mode BN does not update stats).
    """
    layers = prunable_modules(model)
    flops = {name: 0.0 for name, _ in layers}
    handles = []
    for name, m in layers:

        def hook(mod, args, out, name=name):
            # += : a module called more than once contributes each call.
            flops[name] += _layer_flops(mod, args[0], out)

        handles.append(m.register_forward_hook(hook))

    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *in_shape, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return flops


def sparse_forward_flops(layer_flops: dict, densities: dict) -> float:
    """f_S = sum_l density_l * f_D,l; layers missing from `densities` count as dense."""
    unknown = set(densities) - set(layer_flops)
    if unknown:
        raise ValueError(f"densities for unknown layers: {sorted(unknown)}")
    return float(sum(f * float(densities.get(name, 1.0)) for name, f in layer_flops.items()))


# Per-sample training FLOPs of one step, as multiples of (f_dense, f_sparse).
# forward + backward (grad w.r.t. activations + grad w.r.t. weights) = 3 passes;
# "full_grad" needs the dense weight gradient but a sparse forward and sparse
# activation-gradient pass: 2 f_S + f_D.
# Per method and its source: docs/method.md, "Training FLOPs of each method".
_STEP_KINDS = {
    "dense": lambda fd, fs: 3.0 * fd,  # SGD; prune_finetune dense phase; GMP before its first pruning
    "full_grad": lambda fd, fs: 2.0 * fs + fd,  # LinBreg; ML LinBreg fine step; RigL mask update
    "sparse": lambda fd, fs: 3.0 * fs,  # ML LinBreg coarse step; RigL normal step; every SET and static
    # step; GMP after its first pruning; fine-tuning
}


def step_flops(kind: str, f_dense: float, f_sparse: float) -> float:
    """Per-sample training FLOPs of one optimizer step of the given `kind`."""
    if kind not in _STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; valid: {', '.join(_STEP_KINDS)}")
    return float(_STEP_KINDS[kind](f_dense, f_sparse))


STEP_KINDS = tuple(_STEP_KINDS)


class FlopsAccount:
    """Training FLOPs of the steps actually taken (docs/algorithms.md §6), kept on the device.

    Per step and sample: dense 3·f_D, full_grad 2·f_S + f_D, sparse 3·f_S, where
    f_S = Σ_l density_l·f_D,l with the densities of the structure the step computes on: the
    method's fixed one where it has one (ML LinBreg's frozen support S in a coarse step, the
    masks of RigL, SET, static sparse training, GMP and fine-tuning), else the non-zeros of θ
    in that step.

    FLOPs are linear in the per-layer non-zero counts, so a step only adds batch·nnz_l to
    a per-kind vector (three multi-tensor kernels, no host sync); `total()` folds the
    vectors into FLOPs when a row is written."""

    def __init__(self, model: nn.Module, in_shape, device):
        per_layer = dense_layer_flops(model, in_shape)
        layers = prunable_modules(model)
        self.weights = [mod.weight for _, mod in layers]
        self.f_dense = float(sum(per_layer.values()))
        self.flops_per_weight = torch.tensor(
            [per_layer[name] / mod.weight.numel() for name, mod in layers], dtype=torch.float64, device=device
        )
        # Σ over the steps of each kind of batch·nnz_l (exact integers in float64)
        self.nnz_samples = {
            kind: torch.zeros(len(layers), dtype=torch.float64, device=device) for kind in ("full_grad", "sparse")
        }
        self.samples = {kind: 0 for kind in STEP_KINDS}  # Σ batch per kind
        self.counts = {kind: 0 for kind in STEP_KINDS}

    def nnz(self) -> torch.Tensor:
        # ‖sign(w)‖₁ counts the non-zeros with two multi-tensor kernels (exact in fp32 below
        # 2^24 per layer), instead of a reduction launched per layer
        return torch.stack(torch._foreach_norm(torch._foreach_sign([w.detach() for w in self.weights]), 1))

    def f_sparse(self) -> torch.Tensor:
        return (self.nnz().to(torch.float64) * self.flops_per_weight).sum()

    def add_step(self, kind: str, batch: int, structure_nnz: torch.Tensor | None = None) -> None:
        """Count one step of `kind` on `batch` samples. `structure_nnz`: the per-layer sizes of the
        structure the step computes on, when the method fixes one (ML LinBreg's support S in a
        coarse step, RigL's and prune + fine-tune's masks), which can exceed the non-zeros of θ
        (a coordinate of S that shrank to 0 is still computed); else θ's non-zeros."""
        self.counts[kind] += 1
        self.samples[kind] += batch
        if kind != "dense":
            nnz = self.nnz() if structure_nnz is None else structure_nnz
            self.nnz_samples[kind].add_(nnz, alpha=batch)

    def total(self) -> float:
        """FLOPs of all steps so far (reads the device once)."""
        sparse_flops = {kind: float((v * self.flops_per_weight).sum()) for kind, v in self.nnz_samples.items()}
        return (
            3 * self.f_dense * self.samples["dense"]
            + 2 * sparse_flops["full_grad"]
            + self.f_dense * self.samples["full_grad"]
            + 3 * sparse_flops["sparse"]
        )

    def sgd_total(self) -> float:
        """FLOPs dense SGD would have spent on the same samples: 3·f_D per sample."""
        return 3 * self.f_dense * sum(self.samples.values())

    def state_dict(self):
        # the accumulators themselves (exact integers), so a resumed run folds them exactly
        # as an uninterrupted one would
        return dict(
            nnz_samples={k: v.tolist() for k, v in self.nnz_samples.items()},
            samples=dict(self.samples),
            counts=dict(self.counts),
        )

    def load_state_dict(self, state):
        self.counts = dict(state["counts"])
        for kind, v in self.nnz_samples.items():
            v.copy_(torch.tensor(state["nnz_samples"][kind], dtype=torch.float64))
        self.samples = dict(state["samples"])


__all__ = ["FlopsAccount", "STEP_KINDS", "dense_layer_flops", "sparse_forward_flops", "step_flops"]
