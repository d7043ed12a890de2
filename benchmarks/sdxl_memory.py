"""What an SDXL distillation needs on a GPU: the dry run's estimate at SDXL's real size, and (with --measure, on
CUDA) one real-size step with random weights.

The estimate uses SDXL 1.0's shipped configs on meta tensors (nothing allocated) and the same formula as
`dmm distill --dry-run` (dmm_cli/distill/memory.py). --measure builds a random-weight SDXL student and teachers
and both real-size text encoders on the GPU, runs the trainer's own step, and reports peak memory and
samples/s. Prints JSON lines.

  python benchmarks/sdxl_memory.py                          # the estimate table, CPU only
  python benchmarks/sdxl_memory.py --measure --teachers 2 --batch 2   # on a GPU
  python benchmarks/sdxl_memory.py --measure --tiny --teachers 2 --batch 2   # CPU smoke run of the same code
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dmm_cli.console import quiet_loading, set_debug  # noqa: E402
from dmm_cli.distill.memory import ModelSizes, estimate, fitting_settings  # noqa: E402
from dmm_cli.models.single_file import CONFIGS  # noqa: E402
from dmm_cli.recipe import Train  # noqa: E402

SDXL = CONFIGS / "sdxl"
SIDE = 128  # 1024 px pictures
# --tiny: SDXL's topology at small widths, for a CPU smoke run of --measure (not a measurement)
TINY = {"unet": dict(block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 1],
                     attention_head_dim=[2, 4, 8], cross_attention_dim=80, norm_num_groups=16,
                     projection_class_embeddings_input_dim=6 * 256 + 48),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        "text_encoder_2": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               projection_dim=48)}


def _config(part: str, tiny: bool = False) -> dict:
    config = {k: v for k, v in json.loads((SDXL / part / "config.json").read_text()).items() if not k.startswith("_")}
    return {**config, **(TINY[part] if tiny else {})}


def _models(device: str, dtype: torch.dtype, tiny: bool = False):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        unet = UNet2DConditionModel.from_config(_config("unet", tiny)).to(dtype)
        text = CLIPTextModel(CLIPTextConfig(**_config("text_encoder", tiny))).to(dtype)
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2", tiny))).to(dtype)
    return unet, text, text_2


def sizes(teachers: int) -> ModelSizes:
    unet, text, text_2 = _models("meta", torch.float32)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return ModelSizes(count(unet), count(text) + count(text_2), teachers, SDXL / "unet" / "config.json")


def table(teachers: list[int], batches: list[int]) -> None:
    for n in teachers:
        found = sizes(n)
        for batch in batches:
            train = Train(batch_size=batch, precision="bf16", gradient_checkpointing=True)
            print(json.dumps({
                "teachers": n, "batch": batch, "unet_parameters": found.unet, "text_parameters": found.text,
                "estimate_gb_with_checkpointing": round(estimate(train, found, SIDE).total / 1e9, 1),
                "fits": {f"{card} GB": answer for card, answer in fitting_settings(
                    train.model_copy(update={"gradient_checkpointing": False}), found, SIDE).items()},
            }), flush=True)


def measure(teachers: int, batch: int, steps: int, offload: bool, optimizer: str, tiny: bool = False,
            checkpointing: bool = True) -> dict:
    """One real-size SDXL distillation step, timed after a warm-up step."""
    from accelerate import Accelerator

    from dmm_cli.distill.text import TextEncoders
    from dmm_cli.distill.models import Models
    from dmm_cli.distill.trainer import DataSource, Trainer
    from dmm_cli.models.student import make_student

    cuda = torch.cuda.is_available()
    device, dtype, side = ("cuda", torch.bfloat16, SIDE) if cuda else ("cpu", torch.float32, 8)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)
    unet, text, text_2 = _models(device, dtype, tiny)
    student = make_student(unet.float(), teachers)
    del unet
    with torch.device("cpu" if offload else device):
        teacher_unets = [student.__class__.from_config(_config("unet", tiny)).to(dtype) for _ in range(teachers)]
    models = Models(student=student, teachers=teacher_unets, teacher_text_keys=["xl"] * teachers,
                    text_encoders={"xl": TextEncoders([text.eval(), text_2.eval()], zero_empty=True)},
                    student_text_key="xl", alphas_cumprod=torch.linspace(0.9991, 0.0047, 1000),
                    teacher_dtype=dtype)
    items = 64
    data = DataSource(torch.randn(items, 4, side, side), torch.randint(0, 49408, (items, 2, 77)),
                      time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).expand(items, -1))
    cfg = Train(batch_size=batch, lr=1e-5, precision="bf16" if cuda else "no", gradient_checkpointing=checkpointing,
                compile=False, teacher_offload="cpu" if offload else "none", optimizer=optimizer)
    trainer = Trainer(cfg, models, [data], data.caption_ids[0], accelerator)
    trainer.step(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for k in range(1, steps + 1):
        losses = trainer.step(k)
    loss = losses.loss.item()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    row = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tiny": tiny, "teachers": teachers,
           "batch": batch, "offload": offload, "optimizer": optimizer, "gradient_checkpointing": checkpointing,
           "step_s": round(seconds, 3), "samples_per_s": round(batch / seconds, 3), "loss": round(loss, 5)}
    if cuda and not tiny:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["estimate_gib"] = round(estimate(cfg, sizes(1 if offload else teachers), SIDE).total / 2**30, 2)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--measure", action="store_true", help="time one real-size step on CUDA")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--offload", action="store_true")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw-8bit"])
    p.add_argument("--tiny", action="store_true", help="small widths on the CPU: a smoke run of --measure")
    p.add_argument("--checkpointing", nargs="+", default=["on"], choices=["on", "off"])
    a = p.parse_args()
    set_debug(False)
    quiet_loading()
    if not a.measure:
        table(a.teachers, a.batch)
        return
    if not torch.cuda.is_available() and not a.tiny:
        sys.exit("--measure needs a CUDA GPU (or --tiny for a CPU smoke run)")
    for n, batch, checkpointing in itertools.product(a.teachers, a.batch, a.checkpointing):
        # a batch that does not fit this card (an 80 GB one without checkpointing, say) is measured at half the
        # batch instead, so that every configuration still has a peak to set against its estimate
        tried, row = batch, None
        while row is None:
            try:
                row = measure(n, tried, a.steps, a.offload, a.optimizer, a.tiny, checkpointing == "on")
            except torch.OutOfMemoryError:
                if tried == 1:
                    row = {"teachers": n, "batch": tried, "offload": a.offload, "optimizer": a.optimizer,
                           "gradient_checkpointing": checkpointing == "on", "error": "out of memory"}
            gc.collect()  # outside the except block: the failed attempt's tensors are free by now
            torch.cuda.empty_cache()
            if row is None:
                tried //= 2
        print(json.dumps(row | ({"out_of_memory_at_batch": batch} if tried != batch else {})), flush=True)

if __name__ == "__main__":
    main()
