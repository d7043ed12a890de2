"""train.student_sharding: fsdp. The student's weights, gradients and optimizer state split over the processes
with FSDP2 (torch's `fully_shard`): each repeated block (distill/step.py's REPEATED_BLOCKS) is one unit, gathered
for its forward and its backward, and the rest of the UNet one more.

This is torch's FSDP2 called directly rather than through accelerate's FSDP plugin: accelerate turns FSDP on
only for GPU process groups, and one code path on GPUs and on CPU (gloo) is the one the tests run. accelerate
still launches the processes, reduces, and steps the optimizer.

Checkpoints hold full tensors (gathered to the main process), so a sharded run resumes on any number of
processes, and its student is a plain diffusers folder.
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .step import repeated_blocks

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(student: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None) -> torch.nn.Module:
    """Shard `student` in place over every process, onto `device`; returns a weightless (meta) copy of it,
    which `plain_copy` fills with the gathered weights at the end of the run. Weights are gathered in
    `param_dtype` (the training dtype: half the traffic) and gradients reduced in float32."""
    from torch.distributed.device_mesh import init_device_mesh

    skeleton = torch.nn.Module.to(copy.deepcopy(student), "meta")
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in repeated_blocks(student):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(student, mesh=mesh, mp_policy=policy)
    return skeleton


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a sharded tensor (the tensor itself when it is not sharded)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole on every process (a collective: every process calls it)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(whole: torch.Tensor, sharded: torch.Tensor) -> torch.Tensor:
    """`whole` split as `sharded` is (every process holds `whole`)."""
    if not isinstance(sharded, DTensor):
        return whole.to(sharded.device)
    return distribute_tensor(whole.to(sharded.device), sharded.device_mesh, sharded.placements)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the main process, on the CPU (empty elsewhere); a collective."""
    return get_model_state_dict(model, options=_FULL)


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state gathered whole on the main process, keyed by parameter name; a collective."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def plain_copy(skeleton: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The unsharded student, on the CPU, from the gathered weights (main process)."""
    plain = skeleton.to_empty(device="cpu")
    plain.load_state_dict(weights)
    return plain
