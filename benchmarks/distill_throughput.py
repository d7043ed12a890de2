"""Distillation throughput: our trainer's real `Trainer.step` beside the released DMM step, one process.

SD1.5-shaped random weights, built in memory (no file is loaded). The reference is the 'official'
variant of shared/bench/official_step.py (VAE encode every step, fp16 autocast, fp32 teacher).
Prints one JSON line per measurement and a summary with ratios and MFU.

  python benchmarks/distill_throughput.py --batch 16 32 --teachers 4 8          # on a GPU
  python benchmarks/distill_throughput.py --tiny                                 # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd15  # noqa: E402
from dmm_cli.console import quiet_loading, set_debug  # noqa: E402
from dmm_cli.distill.text import TextEncoders  # noqa: E402
from dmm_cli.distill.memory import ModelSizes, estimate  # noqa: E402
from dmm_cli.distill.models import Models  # noqa: E402
from dmm_cli.distill.trainer import DataSource, Trainer  # noqa: E402
from dmm_cli.models.student import make_student  # noqa: E402
from dmm_cli.recipe import Train  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def official(path: Path, batch: int, steps: int, warmup: int, tiny: bool, device: str) -> dict:
    spec = importlib.util.spec_from_file_location("official_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.device(device):
        module.run("official", batch, steps, warmup, "sdpa", tiny, device)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def ours(batch: int, teachers: int, steps: int, warmup: int, tiny: bool, device: str, accelerator,
         compile_: str, offload: bool, checkpointing: bool, compile_budget_s: float) -> dict:
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    teacher_device = "cpu" if offload else device
    with torch.device(device):
        student = make_student(sd15.unet(tiny, torch.float32, device), teachers)
    models = Models(
        student=student,
        teachers=[sd15.unet(tiny, dtype, teacher_device, seed=i + 1) for i in range(teachers)],
        teacher_text_keys=["clip"] * teachers,
        text_encoders={"clip": TextEncoders([sd15.text_encoder(tiny, dtype, device).eval()], zero_empty=False)},
        student_text_key="clip",
        alphas_cumprod=torch.linspace(0.9991, 0.0047, 1000),
        teacher_dtype=dtype,
    )
    side = sd15.configs(tiny)[0]["sample_size"]
    latents = torch.randn(256, 4, side, side)
    ids = torch.randint(0, 49408, (256, 1, 77))
    cfg = Train(batch_size=batch, lr=1e-5, precision="bf16" if cuda else "no", compile=compile_ == "on" or
                ("auto" if compile_ == "auto" else False), teacher_offload="cpu" if offload else "none",
                gradient_checkpointing=checkpointing, compile_budget_s=compile_budget_s)
    trainer = Trainer(cfg, models, [DataSource(latents, ids)], ids[0], accelerator)
    started = time.perf_counter()
    trainer.warm_up()  # the compile stage (and the teachers' CUDA graphs), timed on its own
    compile_s = time.perf_counter() - started
    for k in range(warmup):
        trainer.step(k)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for k in range(warmup, warmup + steps):
        losses = trainer.step(k)
    loss = losses.loss.item()  # one sync at the end, as the trainer does at log steps
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = dict(variant="dmm", teachers=teachers, batch=batch, compile=compile_, offload=offload,
                  compiled=bool(trainer.compiled),  # false where the compile stage failed or overran its budget
                  graphs=trainer.teacher_bank.graphs, compile_s=round(compile_s, 1),
                  step_s=round(seconds, 4), samples_per_s=round(batch / seconds, 2), loss=round(loss, 5),
                  checkpointing=checkpointing,
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)
    if cuda and not tiny:  # the dry run's plan for this very step
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        sizes = ModelSizes(count(student), count(models.text_encoders["clip"].encoders[0]), 1 if offload else teachers,
                           sd15.UNET_CONFIG)
        result["estimate_gib"] = round(estimate(cfg, sizes, sd15.configs(tiny)[0]["sample_size"]).total / 2**30, 2)
    del trainer, models, student
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: a smoke run, not a measurement")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--teachers", type=int, nargs="+", default=[4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", nargs="+", default=["auto"], choices=["auto", "on", "off"])
    p.add_argument("--compile-budget", type=float, metavar="S", default=Train.model_fields["compile_budget_s"].default,
                   help="train.compile_budget_s: a compile stage past S seconds stops, and the step is timed eagerly "
                        "(its row says compiled: false) instead of running past the caller's time limit")
    p.add_argument("--offload", action="store_true", help="also time train.teacher_offload: cpu")
    p.add_argument("--checkpointing", action="store_true", help="with train.gradient_checkpointing")
    p.add_argument("--no-official", action="store_true")
    p.add_argument("--official-step", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "bench" / "official_step.py")
    p.add_argument("--json-out", type=Path)
    a = p.parse_args()
    set_debug(False)
    quiet_loading()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.tiny:
        a.steps, a.warmup = min(a.steps, 2), min(a.warmup, 1)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision="bf16" if device == "cuda" else "no", cpu=device == "cpu")
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json_out:
            a.json_out.write_text(json.dumps(rows, indent=1))

    emit(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
              tiny=a.tiny))
    for batch in a.batch:
        base = None
        if not a.no_official and a.official_step.is_file():
            try:
                base = official(a.official_step, batch, a.steps, a.warmup, a.tiny, device)
                emit(base)
            except Exception as e:  # keep going: the rest of the table is still worth having
                emit(dict(variant="official", batch=batch, error=repr(e)[:300]))
        for teachers in a.teachers:
            for compile_ in a.compile:
                for offload in ([False, True] if a.offload else [False]):
                    try:
                        row = ours(batch, teachers, a.steps, a.warmup, a.tiny, device, accelerator, compile_,
                                   offload, a.checkpointing, a.compile_budget)
                    except Exception as e:  # same: report and continue
                        emit(dict(variant="dmm", batch=batch, teachers=teachers, compile=compile_,
                                  offload=offload, error=repr(e)[:300]))
                        continue
                    peak = peak_flops()
                    row["mfu"] = round(row["samples_per_s"] * sd15.FLOP_PER_SAMPLE / peak, 4) if peak else None
                    if base and "samples_per_s" in base:
                        row["speedup_vs_official"] = round(row["samples_per_s"] / base["samples_per_s"], 3)
                    emit(row)


if __name__ == "__main__":
    main()
