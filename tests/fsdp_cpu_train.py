"""Test helper: scripts/train_gpt.py under accelerate's FSDP2 path, on gloo CPU ranks.

    ACCELERATE_USE_CPU=true accelerate launch --config_file conf/accelerate/fsdp.yaml --num_processes 2 \
        tests/fsdp_cpu_train.py <train_gpt.py overrides>

accelerate (1.15) picks FSDP only for accelerator devices: AcceleratorState's FSDP branch sits under the
multi-GPU-like distributed types, so on CPU it stays MULTI_CPU and ignores the plugin. Everything FSDP2 does
after that choice runs on gloo CPU ranks: `fully_shard` with the plugin's wrap policy (each `Block` a unit) and
mixed-precision policy (bf16: param, reduce and output dtype bf16), sharded checkpoints through
torch.distributed.checkpoint, `get_state_dict` gathering the shards. So this helper sets the distributed type to
FSDP by hand right after an Accelerator is built, with the plugin accelerate made from the FSDP_* variables that
`accelerate launch --config_file conf/accelerate/fsdp.yaml` exported, and then runs the real entry point.

Probes for the tests, from environment variables:
    FSDP_PROBE=<file>      rank 0 writes, per loss call, the dtypes of the loss and per-group losses and the set of
                           dtypes the model's linear layers computed in (their outputs) since the previous call
    FSDP_KILL_AT=<n>       the process exits (os._exit) when the loss function is called for the n-th time
"""
import json
import os
import runpy
import sys
from pathlib import Path

import accelerate
import torch
from accelerate import DistributedType
from accelerate.state import PartialState
from accelerate.utils import FullyShardedDataParallelPlugin

import gpt.train

REPO = Path(__file__).resolve().parents[1]
_init = accelerate.Accelerator.__init__


def _init_forcing_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if os.environ.get("ACCELERATE_USE_FSDP", "false") != "true":
        raise RuntimeError("launch with --config_file conf/accelerate/fsdp.yaml: no FSDP settings in the environment")
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerator() builds it
    if self.state.mixed_precision != "no":
        plugin.set_mixed_precision(self.state.mixed_precision)
    for state in (self.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = plugin


def _linear_dtypes() -> set:
    """The dtypes every nn.Linear of the process computes in (its output dtype), through torch's public global
    forward hook: whatever way the bf16 comes about (FSDP2's param_dtype, autocast), a matmul that ran in bf16
    gives a bf16 output, and one that silently ran in float32 gives float32."""
    seen = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen.add(str(output.dtype))

    torch.nn.modules.module.register_module_forward_hook(hook)
    return seen


def _probed(loss_fn):
    calls = []
    linear = _linear_dtypes()

    def probe(logits, codes):
        calls.append(1)
        if len(calls) == int(os.environ.get("FSDP_KILL_AT", 0)):
            os._exit(3)
        loss, per_group = loss_fn(logits, codes)
        if os.environ.get("FSDP_PROBE") and PartialState().is_main_process:
            with open(os.environ["FSDP_PROBE"], "a") as f:
                f.write(json.dumps({"linear": sorted(linear), "loss": str(loss.dtype),
                                    "per_group": str(per_group.dtype)}) + "\n")
        linear.clear()
        return loss, per_group

    return probe


if __name__ == "__main__":
    accelerate.Accelerator.__init__ = _init_forcing_fsdp
    gpt.train.cross_entropy_per_group = _probed(gpt.train.cross_entropy_per_group)
    sys.argv[0] = str(REPO / "scripts" / "train_gpt.py")  # it imports _hydra beside it: the launch sets PYTHONPATH
    runpy.run_path(sys.argv[0], run_name="__main__")
