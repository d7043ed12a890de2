"""A run's checkpoints: what trains of the student, the optimizers, the LR schedule, the EMA, the RNG state, and how
the run was spread over processes (layout.json, which a resume must keep). The main process writes them,
atomically; a sharded student's tensors are first gathered to it, one at a time, which every process takes part
in. They hold whole tensors, so a run resumes on any number of processes."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelError
from ..files.atomic import atomic_folder
from ..files.safetensors_header import read_header
from ..models.folders import read_config
from . import sharding
from .placement import LAYOUT_FILE

STUDENT_FILE = "student.safetensors"


def save(trainer, folder: Path, step: int, write: bool) -> None:
    """Trainer `trainer`'s state after `step` steps into `folder`, by the process told to `write`."""
    student = trainer.unwrapped_student()
    trained = {name for name, p in student.named_parameters() if p.requires_grad}
    if trainer.skeleton is not None:
        weights = {k: v for k, v in sharding.model_state(student).items() if k in trained}
        optimizer = sharding.optimizer_state(student, trainer.optimizer.optimizer)
        ema = {}
        for k, v in (trainer.ema or {}).items():
            whole = sharding.full(v.detach())
            if write:
                ema[k] = whole.cpu()
    elif write:
        weights = {k: v.detach().cpu() for k, v in student.state_dict().items() if k in trained}
        ema = {k: v.detach().cpu() for k, v in (trainer.ema or {}).items()}
        optimizer = trainer.optimizer.state_dict()
    if not write:
        return
    with atomic_folder(folder) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / STUDENT_FILE)
        extra = {}
        if trainer.ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        if trainer.discriminator is not None:
            head = trainer.accelerator.unwrap_model(trainer.discriminator).head
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                      tmp / "discriminator.safetensors")
            extra["discriminator_optimizer"] = trainer.d_optimizer.state_dict()
        (tmp / LAYOUT_FILE).write_text(json.dumps(trainer.layout()), encoding="utf-8")
        torch.save({"step": step, "optimizer": optimizer, "lr_schedule": trainer.lr_schedule.state_dict(),
                    "rng": torch.get_rng_state(), **extra}, tmp / "state.pt")


def damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder (a file missing, cut short or not what it should be), or None when
    it is whole. It is written atomically, so this is a disk's or a hand's doing."""
    for name in (STUDENT_FILE, LAYOUT_FILE, "state.pt"):
        if not (folder / name).is_file():
            return f"it has no {name}"
    try:
        for name in (STUDENT_FILE, "ema.safetensors", "discriminator.safetensors"):
            if (folder / name).is_file():
                read_header(folder / name)
    except ModelError as e:
        return str(e)
    try:
        read_config(folder / LAYOUT_FILE)
    except ModelError:
        return f"its {LAYOUT_FILE} is not a JSON object"
    if not zipfile.is_zipfile(folder / "state.pt"):  # torch.save's format: a zip, its index at the end
        return "its state.pt is cut short or not a torch checkpoint"
    return None


def load_trainable(student, checkpoint: Path) -> None:
    """A checkpoint's weights into `student` (what trains: the whole UNet, or a LoRA student's adapter, style MLP
    and extras), before any sharding."""
    weights = load_file(checkpoint / STUDENT_FILE)
    trained = {name for name, p in student.named_parameters() if p.requires_grad}
    if set(weights) != trained:
        raise ModelError(f"{checkpoint}: its student weights are not this recipe's student "
                         f"({len(weights)} tensors saved, {len(trained)} train)")
    student.load_state_dict(weights, strict=False)
