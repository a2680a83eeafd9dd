"""The training loop: the one place where steps, evaluation, CSV rows and checkpoints meet.

Data flows one way: config -> (data, model, method) -> loop -> rows -> files.

Per step, nothing is read back to the host: loss, accuracy, the FLOPs account and a
non-finite-loss flag accumulate in device tensors and are read once per epoch.

Resuming: a checkpoint holds model, method (optimizer state, ML LinBreg's cycle and
support, ...), LR scheduler, counters, the FLOPs account and the RNG states. The batch
order and augmentation of an epoch depend only on (seed, epoch), so a run resumed at
any step sees exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from . import __version__, distributed
from .backends import make_backend
from .cpu_alloc import keep_freed_memory
from .config import run_name, unused_notes, validate
from .data import load_dataset, make_loader
from .env import collect_env
from .flops import FlopsAccount
from .methods import method_class, method_from_config
from .loggers import make_logger
from .metrics import layer_stats, model_bytes, sparsity_summary
from .models import create_model
from .rundir import CsvLog, RunDir
from .sparsity import sparse_init_

METRIC_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_acc_pct", "test_loss", "test_acc_pct",
    "sparsity_pct", "sparsity_all_params_pct", "conv_sparsity_pct", "nonzeros", "prunable_params",
    "fine_steps", "coarse_steps", "train_gflops", "train_flops_vs_sgd", "inference_flops_vs_dense",
    "epoch_s", "forward_s", "backward_s", "optimizer_s", "swap_s", "eval_s", "model_bytes_dense", "model_bytes_sparse",
]
LAYER_COLUMNS = ["epoch", "layer", "kind", "shape", "numel", "nonzeros", "density", "kernels", "zero_kernels"]


# SIGUSR2: submitit's (and Slurm's `--signal=USR2@...`) warning that the job's time is up
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR2") if hasattr(signal, name))


class _StopRequest:
    """SIGTERM / SIGINT / SIGUSR2 set a flag; the loop checkpoints after the current step and exits."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


@contextmanager
def _catch_signals(stop: _StopRequest):
    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: signals stay with whoever runs us
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build(cfg: DictConfig, device: torch.device):
    """config -> (data, model, method, loaders, scheduler). Deterministic in cfg.seed."""
    seed_everything(cfg.seed)
    options = {k: v for k, v in OmegaConf.to_container(cfg.dataset, resolve=True).items()
               if k not in ("name", "root", "download", "loader", "num_workers")}
    data = load_dataset(cfg.dataset.name, root=cfg.dataset.root, download=cfg.dataset.download, **options)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "name"}
    model = create_model(cfg.model.name, data.num_classes, data.in_shape, **model_kwargs)
    # dense methods start from dense Kaiming weights (scale 1), fixed-density methods (RigL)
    # at their target density, the others at init.density
    sparse = method_class(cfg.method.name).sparse_init
    sparse_init_(model, density=_init_density(cfg), scheme=cfg.init.scheme, scale=cfg.init.scale if sparse else 1.0,
                 dense_first=cfg.init.dense_first, dense_last=cfg.init.dense_last,
                 by_group=cfg.regularizer.name == "group", seed=cfg.seed)
    model.to(device)
    loader = dict(kind=cfg.dataset.loader, device=device, seed=cfg.seed, num_workers=cfg.dataset.num_workers)
    train_loader = make_loader(split=data.train, batch_size=cfg.batch_size, mean=data.mean, std=data.std,
                               shuffle=True, augment=data.augment, **loader)
    test_loader = make_loader(split=data.test, batch_size=cfg.eval_batch_size, mean=data.mean, std=data.std,
                              shuffle=False, augment=False, **loader)
    method = method_from_config(cfg, model, len(train_loader))
    total_steps = cfg.epochs * len(train_loader)
    if cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(method.optimizer, T_max=total_steps)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(method.optimizer, lambda step: 1.0)
    return data, model, method, train_loader, test_loader, scheduler


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    correct = torch.zeros((), device=loss_sum.device, dtype=torch.long)
    count = 0
    for x, y in loader:
        out = model(x)
        loss_sum += nn.functional.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
        count += y.numel()
    model.train(was_training)
    return loss_sum.item() / count, 100.0 * correct.item() / count


def train(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one training; returns the run's final status dict."""
    validate(cfg)
    for note in unused_notes(cfg):
        print(f"mlbreg: note: {note}", file=sys.stderr)
    run = RunDir(run_dir)
    run_key = f"{__version__}:{run_name(cfg)}"
    previous = run.read_status()
    if previous and cfg.resume and previous.get("status") == "finished" and previous.get("run_key") == run_key:
        return dict(previous, skipped=True)  # a finished run is kept, not recomputed
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    device = distributed.local_device(resolve_device(cfg.device))
    if device.type == "cpu":
        keep_freed_memory()      # CPU steps reuse heap memory instead of page-faulting fresh mappings
    ctx = distributed.init(cfg.distributed, device)
    if not cfg.resume and ctx.is_main:
        run.clear()
    ctx.barrier()
    outcome = Trainer(cfg, run, run_key, device, ctx, previous).run()
    if outcome["status"] == "interrupted":
        _hand_on(outcome.get("signal"))
    return outcome


def _hand_on(signum) -> None:
    """After the checkpoint, give a stop signal to the handler that owned it before the
    run (submitit's SIGUSR2 handler requeues the Slurm job and exits). Only a Python
    handler gets it: with the default action the signal would kill the process instead
    of the clean exit with 128 + signal."""
    if signum is None or signum not in STOP_SIGNALS or signum == signal.SIGINT:
        return
    try:
        handler = signal.getsignal(signum)
    except ValueError:
        return
    if callable(handler):
        signal.raise_signal(signum)


class Trainer:
    """One run: the built parts, the position in the run, and the files it writes."""

    def __init__(self, cfg, run: RunDir, run_key: str, device, ctx, previous):
        self.cfg, self.run_dir, self.run_key, self.device, self.ctx = cfg, run, run_key, device, ctx
        data, self.model, self.method, self.train_loader, self.test_loader, self.scheduler = build(cfg, device)
        self.flops = FlopsAccount(self.model, data.in_shape, device)
        # torch.compile traces torch layers: with compile=true, auto means torch
        self.backend = make_backend("torch" if cfg.compile else cfg.backend, self.model, device, cfg.method.name,
                                    optimizer=self.method.optimizer, batch_size=cfg.batch_size,
                                    in_shape=data.in_shape)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward_model = self.model   # what the training step calls (DDP / compiled wrappers)
        if ctx.enabled:
            if cfg.sync_batchnorm:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                         else nullcontext())
        self.pos = dict(epoch=0, batch=0, step=0)
        self.partial = None
        self.resumed_from = None
        if cfg.resume and run.checkpoint_path.exists():
            self._restore(run.load_checkpoint(run_key))
            self.resumed_from = self.pos["step"]
            if ctx.is_main:
                print(f"mlbreg: resuming {run.path} at epoch {self.pos['epoch'] + 1}, step {self.pos['step']}",
                      file=sys.stderr)
        elif cfg.resume and previous and previous.get("status") in ("running", "interrupted") and ctx.is_main:
            run.clear()  # died before its first checkpoint: nothing to keep
        self.stop = _StopRequest()
        self.metrics_log = CsvLog(run.file("metrics.csv"), METRIC_COLUMNS)
        self.layers_log = CsvLog(run.file("layers.csv"), LAYER_COLUMNS)
        if ctx.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            self.metrics_log.keep_epochs_up_to(self.pos["epoch"])
            self.layers_log.keep_epochs_up_to(self.pos["epoch"])
            OmegaConf.save(cfg, run.file("config.yaml"), resolve=True)
            run.write_env(collect_env(device))
            self._write_status("running", epoch=self.pos["epoch"], step=self.pos["step"])
        self.logger = make_logger(cfg.logger, run.path, self.resumed_from) if ctx.is_main else None

    def _write_status(self, status: str, **info) -> None:
        # with what actually ran: `device=auto` / `backend=auto` resolved
        self.run_dir.write_status(status, run_key=self.run_key, device=self.device.type, backend=self.backend.name,
                                  **info)

    # -- checkpoints -------------------------------------------------------------------
    def _restore(self, ckpt) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.method.load_state_dict(ckpt["method"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.flops.load_state_dict(ckpt["flops"])
        _set_rng_state(ckpt["rng"])
        if ckpt.get("backend"):                # the sparse backend's timed layer choices (older checkpoints: none)
            self.backend.load_state_dict(ckpt["backend"])
        self.pos, self.partial = ckpt["position"], ckpt.get("partial_epoch")

    def checkpoint(self, partial_epoch=None) -> None:
        if self.ctx.is_main:
            self.backend.use_dense()
            self.run_dir.save_checkpoint(dict(
                run_key=self.run_key, model=self.model.state_dict(), method=self.method.state_dict(),
                scheduler=self.scheduler.state_dict(), flops=self.flops.state_dict(), rng=_rng_state(),
                backend=self.backend.state_dict(), position=dict(self.pos), partial_epoch=partial_epoch))
        self.ctx.barrier()

    # -- the run -----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, run = self.cfg, self.run_dir
        self.bar = tqdm(total=cfg.epochs * len(self.train_loader), initial=self.pos["step"],
                        disable=not (cfg.progress and self.ctx.is_main), desc=run_name(cfg).rsplit("/", 1)[0],
                        dynamic_ncols=True)
        try:
            with _catch_signals(self.stop):
                outcome = self._epochs()
        except Exception as err:
            if self.ctx.is_main:
                self._write_status("failed", epoch=self.pos["epoch"], step=self.pos["step"],
                                   message=f"{type(err).__name__}: {err}")
            raise
        finally:
            self.bar.close()
            if self.logger is not None:
                self.logger.close()
        outcome.update(run_key=self.run_key, device=self.device.type, backend=self.backend.name)
        if self.resumed_from is not None:
            outcome["resumed_from"] = self.resumed_from
        if outcome["status"] == "interrupted":
            # the CLI exits with 128 + signal and ends a sweep; under DDP a rank may stop
            # only because another rank got the signal
            outcome["signal"] = self.stop.signal or signal.SIGTERM
        if outcome["status"] == "finished":
            if self.ctx.is_main:
                run.save_model(self.model.state_dict())
                _write_summary(cfg, run, outcome)
            self.checkpoint()
        if self.ctx.is_main:
            run.write_status(**outcome)
        return outcome

    def _stop_requested(self) -> bool:
        # under DDP every rank must stop at the same step: agree every `stop_check_every` steps
        if not self.ctx.enabled:
            return self.stop.signal is not None
        if self.pos["step"] % self.cfg.stop_check_every:
            return False
        return self.ctx.any(self.stop.signal is not None, self.device)

    def _epochs(self) -> dict[str, Any]:
        cfg, pos = self.cfg, self.pos
        self.model.train()
        last_row = None
        while pos["epoch"] < cfg.epochs:
            epoch = pos["epoch"]
            outcome = self._train_epoch(epoch)
            if outcome is not None:
                return outcome
            row, bad_step = self._end_epoch(epoch)
            last_row = row
            if bad_step >= 0:
                return dict(status="diverged", epoch=epoch + 1, step=pos["step"],
                            message=f"non-finite training loss first at step {bad_step} (epoch {epoch + 1})")
            if cfg.checkpoint_every and (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs:
                self.checkpoint()
            # a signal after the last epoch's rows changes nothing: the run finishes
            if epoch + 1 < cfg.epochs and self.ctx.any(self.stop.signal is not None, self.device):
                self.checkpoint()
                return dict(status="interrupted", epoch=epoch + 1, step=pos["step"],
                            message=f"stopped by signal {self.stop.signal} after epoch {epoch + 1}; rerun to resume")
        return dict(status="finished", epoch=pos["epoch"], step=pos["step"], final=last_row)

    def _train_epoch(self, epoch: int):
        """Train one epoch (or its rest, when resumed inside it). Returns an outcome dict if
        the run must stop inside the epoch, else None; the epoch's sums are in self.acc."""
        pos, device, method, backend = self.pos, self.device, self.method, self.backend
        acc = self.partial or dict(loss=0.0, correct=0, seen=0, fwd=0.0, bwd=0.0, opt=0.0, swap=0.0, wall=0.0,
                                   bad_step=-1)
        if self.partial and not self.ctx.is_main:
            acc = dict(acc, loss=0.0, correct=0)
        self.partial = None
        loss_sum = torch.tensor(acc["loss"], dtype=torch.float64, device=device)
        correct = torch.tensor(acc["correct"], dtype=torch.long, device=device)
        bad_step = torch.tensor(acc["bad_step"], dtype=torch.long, device=device)
        times = {k: acc[k] for k in ("fwd", "bwd", "opt", "swap")}
        seen = acc["seen"]
        t_epoch = time.perf_counter() - acc["wall"]
        self.train_loader.set_epoch(epoch)
        for b, (x, y) in enumerate(self.train_loader):
            if b < pos["batch"]:
                continue  # resumed inside this epoch: these batches were already trained on
            kind = method.step_kind()
            t_swap = time.perf_counter()
            backend.before_step(kind)
            x_local, y_local, weight = self.ctx.shard(x, y)
            if self.cfg.channels_last and x_local.dim() == 4:
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
            self.flops.add_step(kind, y.numel())   # densities of the weights this step used
            method.step()
            self.scheduler.step()
            t3 = time.perf_counter()
            backend.after_step(kind)
            t4 = time.perf_counter()
            times["fwd"] += t1 - t0
            times["bwd"] += t2 - t1
            times["opt"] += t3 - t2
            times["swap"] += (t0 - t_swap) + (t4 - t3)
            loss = loss.detach()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), pos["step"], bad_step)
            loss_sum += loss.double() * y_local.numel()
            correct += (out.detach().argmax(1) == y_local).sum()
            seen += y.numel()
            pos["step"] += 1
            pos["batch"] = b + 1
            self.bar.update(1)
            if self._stop_requested():
                # global sums (rank 0 carries them on resume, the other ranks restart at 0)
                partial = dict(loss=self.ctx.all_sum(loss_sum.clone()).item(),
                               correct=self.ctx.all_sum(correct.clone()).item(), seen=seen, **times,
                               wall=time.perf_counter() - t_epoch, bad_step=int(bad_step))
                self.checkpoint(partial)
                return dict(status="interrupted", epoch=epoch, step=pos["step"],
                            message=f"stopped by signal {self.stop.signal} at step {pos['step']}; rerun to resume")
        self.acc = dict(loss_sum=self.ctx.all_sum(loss_sum), correct=self.ctx.all_sum(correct), seen=seen,
                        bad_step=bad_step, times=times, epoch_s=time.perf_counter() - t_epoch)
        return None

    def _end_epoch(self, epoch: int):
        """Evaluate, write the epoch's rows, run the method's epoch hook."""
        acc, flops, pos = self.acc, self.flops, self.pos
        self.backend.use_dense()
        t_eval = time.perf_counter()
        test_loss, test_acc = evaluate(self.model, self.test_loader)
        layers = layer_stats(self.model)
        sparsity = sparsity_summary(self.model, layers)
        f_sparse = flops.f_sparse().item()
        total_flops = flops.total()
        pos["epoch"], pos["batch"] = epoch + 1, 0
        times = acc["times"]
        row = dict(epoch=epoch + 1, step=pos["step"], lr=self.scheduler.get_last_lr()[0],
                   train_loss=acc["loss_sum"].item() / acc["seen"],
                   train_acc_pct=100.0 * acc["correct"].item() / acc["seen"],
                   test_loss=test_loss, test_acc_pct=test_acc, **sparsity,
                   fine_steps=flops.counts["full_grad"] + flops.counts["dense"], coarse_steps=flops.counts["sparse"],
                   train_gflops=total_flops / 1e9, train_flops_vs_sgd=total_flops / flops.sgd_total(),
                   inference_flops_vs_dense=f_sparse / flops.f_dense, epoch_s=acc["epoch_s"],
                   forward_s=times["fwd"], backward_s=times["bwd"], optimizer_s=times["opt"], swap_s=times["swap"],
                   eval_s=time.perf_counter() - t_eval, **model_bytes(self.model, layers))
        if self.ctx.is_main:
            self.metrics_log.append([row])
            if self.logger is not None:
                self.logger.append(row)
            self.layers_log.append([dict(epoch=epoch + 1, **layer) for layer in layers])
        self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", test_acc=f"{test_acc:.1f}",
                             sparsity=f"{sparsity['sparsity_pct']:.1f}")
        self.method.end_epoch(epoch + 1)
        return row, int(acc["bad_step"])


def _init_density(cfg: DictConfig) -> float:
    return method_class(cfg.method.name).init_density(cfg)


def _write_summary(cfg: DictConfig, run: RunDir, outcome: dict[str, Any]) -> None:
    import csv
    final = outcome.get("final") or {}
    row = dict(dataset=cfg.dataset.name, model=cfg.model.name, method=cfg.method.name,
               regularizer=cfg.regularizer.name, lam=cfg.lam, m=cfg.m, init=cfg.init.scheme,
               init_density=_init_density(cfg), target_sparsity=cfg.sparsity, init_scale=cfg.init.scale, lr=cfg.lr, momentum=cfg.momentum,
               epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed)
    row.update({k: v for k, v in final.items() if k not in ("epoch", "lr")})  # lr: the configured one
    row.update(run_name=run_name(cfg), status="finished")
    tmp = run.file("summary.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    tmp.replace(run.file("summary.csv"))
