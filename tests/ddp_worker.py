"""Run one training under torchrun and save this rank's final state (for test_distributed).

MLBREG_TEST_SIGNAL_AT_STEP=N: rank 0 sends itself SIGTERM while step N runs (fault injection)."""

import os
import signal
import sys

import torch
import torch.distributed as dist

from mlbreg.flops import FlopsAccount
from mlbreg.loop import Trainer
from mlbreg.train import train

from helpers import make_cfg

out_dir = sys.argv[1]
overrides = sys.argv[2:]
captured = {}
original = Trainer.run


def run_and_keep(self):
    outcome = original(self)
    captured["model"] = {k: v.clone() for k, v in self.model.state_dict().items()}
    captured["method"] = self.method.state_dict()
    return outcome


Trainer.run = run_and_keep
signal_at = int(os.environ.get("MLBREG_TEST_SIGNAL_AT_STEP", 0)) if os.environ.get("RANK", "0") == "0" else 0
add_step, steps = FlopsAccount.add_step, []


def add_step_counted(self, kind, batch, *structure):
    steps.append(kind)
    if len(steps) == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return add_step(self, kind, batch, *structure)


FlopsAccount.add_step = add_step_counted
train(make_cfg(*overrides), out_dir + "/run")
captured["steps_trained"] = len(steps)  # by this process (a resumed run trains the rest only)
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save(captured, f"{out_dir}/rank{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
