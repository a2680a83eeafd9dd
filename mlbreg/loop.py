"""The training loop: the one place where steps, evaluation, CSV rows and checkpoints meet.

    build the parts (mlbreg.build), restore the checkpoint if any
    per epoch:  per step: backend phase, forward/backward, method step, account
                then: evaluate, the epoch's rows, checkpoint

Per step, nothing is read back to the host: loss, accuracy, the FLOPs account and a
non-finite-loss flag accumulate in device tensors (`EpochMeter`) and are read once per epoch.

Resuming: a checkpoint holds model, method (optimizer state, ML LinBreg's cycle and
support, ...), LR scheduler, counters, the FLOPs account and the RNG states. The batch
order and augmentation of an epoch depend only on (seed, epoch), so a run resumed at
any step sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import csv
import io
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from .backends import make_backend
from .build import build, evaluate, init_density
from .config import use_channels_last
from .env import collect_env
from .failures import describe
from .flops import FlopsAccount
from .labels import all_zero_note, epoch_ranges
from .loggers import make_logger
from .metrics import layer_stats, model_bytes, sparsity_summary
from .models import prunable_modules
from .rundir import CheckpointError, CsvLog, RunDir, atomic_write_bytes
from .runstate import TIMERS, EpochMeter, RngState, StopGuard
from .status import Status

__all__ = ["LAYER_COLUMNS", "METRIC_COLUMNS", "Trainer", "write_summary"]

METRIC_COLUMNS = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc_pct",
    "test_loss",
    "test_acc_pct",
    "sparsity_pct",
    "sparsity_all_params_pct",
    "conv_sparsity_pct",
    "nonzeros",
    "prunable_params",
    "fine_steps",
    "coarse_steps",
    "train_gflops",
    "train_flops_vs_sgd",
    "inference_flops_vs_dense",
    "epoch_s",
    *TIMERS,
    "eval_s",
    "model_bytes_dense",
    "model_bytes_sparse",
]
LAYER_COLUMNS = ["epoch", "layer", "kind", "shape", "numel", "nonzeros", "density", "kernels", "zero_kernels"]


@dataclass
class Position:
    """Where a run is: epochs done, batches done in the current epoch, steps done."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


class Trainer:
    """One run: the built parts, the position in the run, and the files it writes."""

    def __init__(self, cfg, run: RunDir, *, run_key: str, device, ctx, previous, name: str):
        self.cfg, self.run_dir, self.run_key, self.device, self.ctx, self.name = cfg, run, run_key, device, ctx, name
        self._build_parts()
        self.pos = Position()
        self.partial, self.resumed_from = None, None  # the checkpoint's `partial_epoch`, its step
        self._resume(previous)
        self.stop = StopGuard(ctx, device, cfg.stop_check_every)
        self._open_files()

    def _build_parts(self) -> None:
        cfg, device = self.cfg, self.device
        self.channels_last = use_channels_last(cfg)
        parts = build(cfg, device)
        data, self.model, self.method, self.scheduler = parts.data, parts.model, parts.method, parts.scheduler
        self.train_loader, self.test_loader = parts.train_loader, parts.test_loader
        self.flops = FlopsAccount(self.model, data.in_shape, device)
        # torch.compile traces torch layers: with compile=true, auto means torch
        self.backend = make_backend(
            "torch" if cfg.compile else cfg.backend,
            self.model,
            device,
            cfg.method.name,
            optimizer=self.method.optimizer,
            batch_size=cfg.batch_size,
            in_shape=data.in_shape,
            precision=cfg.precision,
            channels_last=self.channels_last,
        )
        # forward_model: what the training step calls (DDP / compiled wrappers)
        self.model, self.forward_model, self.autocast = _wrap(cfg, self.model, self.ctx, device)

    def _resume(self, previous) -> None:
        cfg, run = self.cfg, self.run_dir
        if cfg.resume and run.checkpoint_path.exists():
            self._restore(run.load_checkpoint(self.run_key))
            self._check_rows()
            self.resumed_from = self.pos.step
            if self.ctx.is_main:
                print(f"mlbreg: resuming {run.path} at epoch {self.pos.epoch + 1}, step {self.pos.step}", file=sys.stderr)
        elif cfg.resume and previous and previous.get("status") in (Status.RUNNING, Status.INTERRUPTED) and self.ctx.is_main:
            run.clear()  # died before its first checkpoint: nothing to keep

    def _logs(self) -> tuple[CsvLog, CsvLog]:
        run = self.run_dir
        return (
            CsvLog(run.file("metrics.csv"), METRIC_COLUMNS),
            CsvLog(run.file("layers.csv"), LAYER_COLUMNS, key=("epoch", "layer")),
        )

    def _check_rows(self) -> None:
        """Refuse to resume over rows lost before the checkpoint (a file cut short, rows deleted): the
        checkpoint cannot recompute them, and the finished run would silently lack those epochs."""
        epoch, layers = self.pos.epoch, [name for name, _ in prunable_modules(self.model)]
        for log in self._logs():
            missing = log.missing_epochs(epoch, layers if "layer" in log.key else ())
            if missing:
                raise CheckpointError(
                    f"{log.path} lacks the rows of epoch(s) {epoch_ranges(missing)} of the {epoch} before the "
                    f"checkpoint (cut short or edited?), and the checkpoint cannot recompute them: retrain the run "
                    f"from scratch with resume=false (replaces its files), or put the complete file back and rerun"
                )

    def _open_files(self) -> None:
        run = self.run_dir
        self.metrics_log, self.layers_log = self._logs()
        if self.ctx.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            for log in (self.metrics_log, self.layers_log):
                dropped = log.keep_epochs_up_to(self.pos.epoch)
                if dropped:
                    print(
                        f"mlbreg: note: {log.path}: dropped line {', '.join(map(str, dropped))}, which "
                        f"{'is not a row' if len(dropped) == 1 else 'are not rows'} of the file",
                        file=sys.stderr,
                    )
            text = OmegaConf.to_yaml(self.cfg, resolve=True)
            atomic_write_bytes(run.file("config.yaml"), lambda f: f.write(text.encode()))
            run.write_env(collect_env(self.device))
            self._write_status(Status.RUNNING, epoch=self.pos.epoch, step=self.pos.step)
        self.logger = make_logger(self.cfg.logger, run.path, self.resumed_from) if self.ctx.is_main else None

    def _write_status(self, status: str, **info) -> None:
        # with what actually ran: `device=auto` / `backend=auto` resolved
        self.run_dir.write_status(status, run_key=self.run_key, device=self.device.type, backend=self.backend.name, **info)

    def _restore(self, ckpt) -> None:
        self.model.load_state_dict(ckpt["model"])
        try:
            self.method.load_state_dict(ckpt["method"])
        except ValueError as err:  # a state the method refuses to continue (an older adaptive criterion)
            raise CheckpointError(f"checkpoint {self.run_dir.checkpoint_path}: {err}") from err
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.flops.load_state_dict(ckpt["flops"])
        RngState.restore(ckpt["rng"])
        self.backend.load_state_dict(ckpt["backend"])  # the sparse backend's timed layer choices
        self.pos, self.partial = Position(**ckpt["position"]), ckpt.get("partial_epoch")

    def checkpoint(self, partial_epoch=None) -> None:
        if self.ctx.is_main:
            self.backend.use_dense()
            self.run_dir.save_checkpoint(
                dict(
                    run_key=self.run_key,
                    model=self.model.state_dict(),
                    method=self.method.state_dict(),
                    scheduler=self.scheduler.state_dict(),
                    flops=self.flops.state_dict(),
                    rng=RngState.capture(),
                    backend=self.backend.state_dict(),
                    position=asdict(self.pos),
                    partial_epoch=partial_epoch,
                )
            )
            # status.json follows the checkpoints: a killed run's says where a rerun resumes
            self._write_status(Status.RUNNING, epoch=self.pos.epoch, step=self.pos.step)
        self.ctx.barrier()

    def run(self) -> dict[str, Any]:
        self.bar = tqdm(
            total=self.cfg.epochs * len(self.train_loader),
            initial=self.pos.step,
            dynamic_ncols=True,
            disable=not (self.cfg.progress and self.ctx.is_main),
            desc=self.name.rsplit("/", 1)[0],
        )
        try:
            with self.stop.catching():
                outcome = self._epochs()
        except Exception as err:
            if self.ctx.is_main:
                try:  # the cause, not what it caused: "No space left on device", not torch's RuntimeError
                    self._write_status(
                        Status.FAILED,
                        epoch=self.pos.epoch,
                        step=self.pos.step,
                        message=describe(err, "output_root=DIR") or f"{type(err).__name__}: {err}",
                    )
                except OSError:  # the full disk may refuse the status too: the error raised below says why
                    pass
            raise
        finally:
            self.bar.close()
            if self.logger is not None:
                self.logger.close()
        return self._conclude(outcome)

    def _epochs(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        self.model.train()
        row = None
        while pos.epoch < cfg.epochs:
            epoch, more = pos.epoch, pos.epoch + 1 < cfg.epochs
            meter = EpochMeter(self.device, self.partial, keep_sums=self.ctx.is_main)
            self.partial = None
            if not self._train_epoch(epoch, meter):
                return dict(
                    status=Status.INTERRUPTED,
                    epoch=epoch,
                    step=pos.step,
                    message=f"stopped by signal {self.stop.signal} at step {pos.step}; rerun to resume",
                )
            row = self._end_epoch(epoch, meter)
            if int(meter.bad_step) >= 0:
                return dict(
                    status=Status.DIVERGED,
                    epoch=epoch + 1,
                    step=pos.step,
                    message=f"non-finite training loss first at step {int(meter.bad_step)} (epoch {epoch + 1})",
                )
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and more:
                self.checkpoint()
            # a signal after the last epoch's rows changes nothing: the run finishes
            if more and self.stop.any_rank():
                self.checkpoint()
                return dict(
                    status=Status.INTERRUPTED,
                    epoch=epoch + 1,
                    step=pos.step,
                    message=f"stopped by signal {self.stop.signal} after epoch {epoch + 1}; rerun to resume",
                )
        return dict(status=Status.FINISHED, epoch=pos.epoch, step=pos.step, final=row)

    def _train_epoch(self, epoch: int, meter: EpochMeter) -> bool:
        """Train one epoch (or its rest, when resumed inside it); False: stopped by a signal, checkpointed."""
        pos = self.pos
        self.train_loader.set_epoch(epoch)
        for b, (x, y) in enumerate(self.train_loader):
            if b < pos.batch:
                continue  # resumed inside this epoch: these batches were already trained on
            self._step(x, y, meter)
            pos.step += 1
            pos.batch = b + 1
            self.bar.update(1)
            if self.stop.after_step(pos.step):
                self.checkpoint(meter.partial_epoch(self.ctx))
                return False
        meter.finish(self.ctx)
        return True

    def _step(self, x, y, meter: EpochMeter) -> None:
        method, backend = self.method, self.backend
        kind = method.step_kind()
        t_swap = time.perf_counter()
        backend.before_step(kind)
        x_local, y_local, weight = self.ctx.shard(x, y)
        if self.channels_last and x_local.dim() == 4:
            x_local = x_local.contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with self.autocast:
            out = self.forward_model(x_local)
            loss = nn.functional.cross_entropy(out.float(), y_local)
        t1 = time.perf_counter()
        method.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        backend.after_backward()
        t2 = time.perf_counter()
        # the structure this step computed on (a coarse step's frozen support), else θ's non-zeros
        self.flops.add_step(kind, y.numel(), self.method.structure_nnz(kind))
        method.step()
        self.scheduler.step()
        t3 = time.perf_counter()
        backend.after_step(kind)
        t4 = time.perf_counter()
        meter.time(forward_s=t1 - t0, backward_s=t2 - t1, optimizer_s=t3 - t2, swap_s=(t0 - t_swap) + (t4 - t3))
        meter.account(loss, out, y_local, y.numel(), self.pos.step)

    def _end_epoch(self, epoch: int, meter: EpochMeter) -> dict[str, Any]:
        """Evaluate, write the epoch's rows, run the method's epoch hook."""
        row, layers = self._epoch_row(epoch, meter)
        if self.ctx.is_main:
            self.metrics_log.append([row])
            if self.logger is not None:
                self.logger.append(row)
            self.layers_log.append([dict(epoch=epoch + 1, **layer) for layer in layers])
            self._record_layer_choices()
        self.bar.set_postfix(
            loss=f"{row['train_loss']:.3f}", test_acc=f"{row['test_acc_pct']:.1f}", sparsity=f"{row['sparsity_pct']:.1f}"
        )
        self.method.end_epoch(epoch + 1)
        return row

    def _record_layer_choices(self) -> None:
        """env.json: which layers ran sparse or dense in this attempt and what decided each (the machine's
        record of timed choices, a timing in this run, the checkpoint, forced, ineligible)."""
        record = getattr(self.backend, "choice_record", None)
        if record is not None:
            store = self.backend.choices.store
            self.run_dir.update_env(layer_choices=record(), layer_choice_record=str(store.path) if store is not None else "off")

    def _epoch_row(self, epoch: int, meter: EpochMeter):
        """The epoch's metrics.csv row (and the per-layer stats); moves the position to the next epoch."""
        self.backend.use_dense()
        t_eval = time.perf_counter()
        test_loss, test_acc = evaluate(self.model, self.test_loader)
        layers = layer_stats(self.model)
        sparsity = sparsity_summary(self.model, layers)
        self.pos.epoch, self.pos.batch = epoch + 1, 0
        row = dict(
            epoch=epoch + 1,
            step=self.pos.step,
            lr=self.scheduler.get_last_lr()[0],
            train_loss=meter.train_loss(),
            train_acc_pct=meter.train_acc_pct(),
            test_loss=test_loss,
            test_acc_pct=test_acc,
            **sparsity,
            **_flops_columns(self.flops),
            epoch_s=meter.epoch_s,
            **meter.times,
            eval_s=time.perf_counter() - t_eval,
            **model_bytes(self.model, layers),
        )
        return row, layers

    def _conclude(self, outcome: dict[str, Any]) -> dict[str, Any]:
        """The outcome's status.json; a finished run's model.pt, summary.csv and last checkpoint."""
        outcome.update(run_key=self.run_key, device=self.device.type, backend=self.backend.name)
        if self.resumed_from is not None:
            outcome["resumed_from"] = self.resumed_from
        if outcome["status"] == Status.INTERRUPTED:
            # the CLI exits with 128 + signal, ending a sweep; a DDP rank may stop for another's signal
            outcome["signal"] = self.stop.signal or signal.SIGTERM
        if outcome["status"] == Status.FINISHED:
            note = all_zero_note(outcome.get("final"), self.cfg.lam if "lam" in self.method.main_keys else None)
            if note:
                outcome["message"] = note
            if self.ctx.is_main:
                self.run_dir.save_model(self.model.state_dict())
                write_summary(self.cfg, self.run_dir, outcome, self.name)
            self.checkpoint()
        if self.ctx.is_main:
            self.run_dir.write_status(**outcome)
        return outcome


def _wrap(cfg, model: nn.Module, ctx, device):
    """(model, the module the training step calls, the autocast context): channels-last,
    DDP (with SyncBatchNorm), torch.compile, bf16 as configured."""
    if use_channels_last(cfg):
        model.to(memory_format=torch.channels_last)
    forward_model = model
    if ctx.enabled:
        if cfg.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        forward_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    return model, forward_model, autocast


def _flops_columns(flops: FlopsAccount) -> dict[str, Any]:
    f_sparse = flops.f_sparse().item()
    total_flops = flops.total()
    return dict(
        fine_steps=flops.counts["full_grad"] + flops.counts["dense"],
        coarse_steps=flops.counts["sparse"],
        train_gflops=total_flops / 1e9,
        train_flops_vs_sgd=total_flops / flops.sgd_total(),
        inference_flops_vs_dense=f_sparse / flops.f_dense,
    )


def write_summary(cfg: DictConfig, run: RunDir, outcome: dict[str, Any], name: str) -> None:
    """summary.csv: the run's identifying config and its final row (`name`: its run_name)."""
    final = outcome.get("final") or {}
    row = dict(
        dataset=cfg.dataset.name,
        model=cfg.model.name,
        method=cfg.method.name,
        regularizer=cfg.regularizer.name,
        lam=cfg.lam,
        m=cfg.m,
        init=cfg.init.scheme,
        init_density=init_density(cfg),
        target_sparsity=cfg.sparsity,
        init_scale=cfg.init.scale,
        lr=cfg.lr,
        momentum=cfg.momentum,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    row.update({k: v for k, v in final.items() if k not in ("epoch", "lr")})  # lr: the configured one
    row.update(run_name=name, status=Status.FINISHED)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
    atomic_write_bytes(run.file("summary.csv"), lambda f: f.write(buf.getvalue().encode()))
