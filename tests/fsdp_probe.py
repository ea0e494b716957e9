"""Run under torchrun by tests/test_data_parallel.py: FSDP2 (fully_shard) sampling under full_parameters."""
import types

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

from mtrl.algorithms.common import full_parameters
from mtrl.policy import load_model_and_tokenizer, resolve_model

acc = Accelerator(cpu=True)
model, tok, _ = load_model_and_tokenizer(resolve_model("mtrl:tiny-marian"))
model.float().eval()
enc = tok(["A man is reading a newspaper.", "Two dogs play in the snow."], return_tensors="pt", padding=True)
with torch.no_grad():
    unsharded = model.generate(**enc, max_new_tokens=12, do_sample=False)
for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
    fully_shard(layer)
fully_shard(model)
groups = sum(1 for m in model.modules() if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_groups)
calls = {"unshard": 0}
original = FSDPParamGroup.unshard


def counted(self, *a, **k):
    if not self.is_unsharded:
        calls["unshard"] += 1
    return original(self, *a, **k)


FSDPParamGroup.unshard = counted
with torch.no_grad(), full_parameters(model, types.SimpleNamespace(distributed_type=DistributedType.FSDP)):
    sharded = model.generate(**enc, max_new_tokens=12, do_sample=False)
resharded = all(not g.is_unsharded for m in model.modules() if isinstance(m, FSDPModule)
                for g in m._get_fsdp_state()._fsdp_param_groups)
with open(f"rank-{acc.process_index}.txt", "w") as f:  # in the working directory, one file per process
    f.write(f"rank {acc.process_index}: same={torch.equal(sharded, unsharded)} groups={groups} "
            f"gathers={calls['unshard']} tokens={sharded.shape[1] - 1} resharded={resharded}")
acc.wait_for_everyone()
acc.state.destroy_process_group()  # exit cleanly: gloo aborts a process that leaves with its threads up
