"""Run one training under torchrun and save this rank's final state (for test_distributed)."""
import sys

import torch
import torch.distributed as dist

from conftest import make_cfg
from mlbreg.train import Trainer, train

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
train(make_cfg(*overrides), out_dir + "/run")
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save(captured, f"{out_dir}/rank{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
