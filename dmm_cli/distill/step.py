"""How a distillation step runs fast: teachers at one fixed shape, replayed as CUDA graphs, and the repeated
blocks of every UNet compiled with static shapes, cached under $DMM_HOME, with an eager fallback.

An eager UNet forward costs about the same host time (~1,200 aten launches) at any batch size, so one forward
per teacher on its small share of the batch leaves the GPU idle, more so with every teacher added. Here each
teacher runs on exactly `rows` rows (its share, padded by repeating its last row), so its forward has one
shape for the whole run and is captured once as a CUDA graph: a replay costs microseconds of host time,
whatever the number of teachers. UNet rows never mix (group norm, attention and convolutions are per
sample), so the padding's outputs are simply dropped and change nothing else.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import torch

from .. import console
from ..files import state
from .prediction import convert

# The UNet's repeated regions: compiled one class at a time, so a cold compile traces a handful of small
# graphs instead of the whole model (diffusers' compile_repeated_blocks, widened to the ResNet blocks).
REPEATED_BLOCKS = ("Transformer2DModel", "ResnetBlock2D")


@dataclass
class TeacherRunner:
    """A UNet on the device that answers for one or more teachers, with its feature taps."""

    unet: torch.nn.Module
    taps: object  # models.student.FeatureTaps
    graphs: dict = field(default_factory=dict)  # input shapes -> _Graph


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    output: torch.Tensor
    features: dict[str, torch.Tensor]


@dataclass
class _Layout:
    """Where each sample of a (sorted) batch goes among the teachers' padded rows, and back."""

    active: list[int]  # teachers with at least one sample, in order
    pad_index: torch.Tensor  # for each padded row, the batch row it copies
    take_index: torch.Tensor  # for each batch row, its padded row among the active teachers' rows


def max_share(labels: torch.Tensor, teachers: int) -> int:
    """The most samples any teacher gets in a batch split like `labels`: every teacher's fixed row count."""
    return int(torch.bincount(labels, minlength=teachers).max())


class TeacherBank:
    """Every teacher's prediction and block features on its share of a batch, at a fixed shape per teacher.

    `runners[i]` runs teacher i (old styles of a previous student share one runner; with CPU offload, one
    device slot serves every teacher, its weights copied in first). With `graphs`, each runner's forward at
    each input shape is captured as a CUDA graph on first use; a capture that fails falls back to eager
    forwards, with one warning.
    """

    def __init__(self, teachers: list, runners: list[TeacherRunner], rows: int, *, prediction: str,
                 alphas_cumprod: torch.Tensor, dtype: torch.dtype, memory_format, offload: bool, graphs: bool):
        self.teachers, self.runners, self.rows = teachers, runners, rows
        self.prediction, self.alphas_cumprod, self.dtype = prediction, alphas_cumprod, dtype
        self.memory_format, self.offload, self.graphs = memory_format, offload, graphs
        self._layouts: dict[tuple, _Layout] = {}
        self._pool = None

    def layout(self, counts: list[int], device) -> _Layout:
        """Cached per split: after the first steps no index is built or copied to the device again."""
        key = tuple(counts)
        if key not in self._layouts:
            if max(counts) > self.rows:
                raise ValueError(f"a teacher got {max(counts)} samples, more than its {self.rows} fixed rows")
            pad, take, active, start = [], [], [], 0
            for i, count in enumerate(counts):
                if count == 0:
                    continue
                slot = len(active) * self.rows
                active.append(i)
                pad += [start + min(j, count - 1) for j in range(self.rows)]
                take += [slot + j for j in range(count)]
                start += count
            self._layouts[key] = _Layout(active, torch.tensor(pad, device=device), torch.tensor(take, device=device))
        return self._layouts[key]

    def __call__(self, xt: torch.Tensor, t: torch.Tensor, contexts: dict, counts: list[int],
                 time_ids: torch.Tensor | None = None):
        """Targets as the student's prediction type (float32) and block features, in batch order."""
        plan = self.layout(counts, xt.device)
        outputs, feats = [], []
        with torch.inference_mode():
            for k, i in enumerate(plan.active):
                teacher, runner = self.teachers[i], self.runners[i]
                # index_select makes fresh tensors: no row views, so no storage offsets for a compiler to guard on
                rows = plan.pad_index[k * self.rows:(k + 1) * self.rows]
                if self.offload:
                    for dst, src in zip(runner.unet.parameters(), teacher.unet.parameters()):
                        dst.copy_(src, non_blocking=True)
                x, steps = xt.index_select(0, rows), t.index_select(0, rows)
                inputs = {"sample": x.to(self.dtype).contiguous(memory_format=self.memory_format), "timestep": steps}
                cond = contexts[teacher.text_encoder_key][rows].to(self.dtype)
                inputs["encoder_hidden_states"] = cond.context
                if cond.pooled is not None:
                    inputs["text_embeds"] = cond.pooled
                    inputs["time_ids"] = time_ids.index_select(0, rows).to(self.dtype)
                if teacher.style is not None:
                    inputs["class_labels"] = teacher.style.to(xt.device, self.dtype).expand(self.rows, -1)
                out, features = self._forward(runner, inputs)
                if teacher.prediction != self.prediction:
                    out = convert(out.float(), teacher.prediction, self.prediction, x.float(),
                                  self.alphas_cumprod[steps])
                outputs.append(out)
                feats.append(features)
        # Outside inference mode these ops give ordinary tensors, which the loss may keep for its backward.
        take = plan.take_index
        target = torch.cat(outputs).float().index_select(0, take)
        features = {name: torch.cat([f[name] for f in feats]).index_select(0, take) for name in feats[0]}
        return target, features

    def _forward(self, runner: TeacherRunner, inputs: dict):
        captured = self._graph(runner, inputs) if self.graphs else None
        if captured is None:
            return _call(runner.unet, inputs), runner.taps.take()
        for name, value in inputs.items():
            captured.inputs[name].copy_(value, non_blocking=True)
        captured.graph.replay()
        # A runner may answer for several teachers in one batch (old styles, offload): copy what it returned.
        return captured.output.clone(), {k: v.clone() for k, v in captured.features.items()}

    def _graph(self, runner: TeacherRunner, inputs: dict) -> _Graph | None:
        """The runner's graph for these input shapes, captured on first use; None once a capture failed."""
        key = tuple((name, tuple(v.shape)) for name, v in inputs.items())
        if key not in runner.graphs:
            try:
                runner.graphs[key] = self._capture(runner, inputs)
            except CompileOverrun:  # the compile stage's, not the capture's
                raise
            except Exception as e:  # an op that cannot be captured: eager forwards cost host time, not results
                console.warn(f"teachers run without CUDA graphs ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                self.graphs = False
                torch.cuda.synchronize()
                return None
        return runner.graphs[key]

    def _capture(self, runner: TeacherRunner, inputs: dict) -> _Graph:
        static = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (and compile) outside the capture, as CUDA graphs require
            for _ in range(2):
                _call(runner.unet, static)
                runner.taps.take()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = _call(runner.unet, static)
            features = runner.taps.take()
        return _Graph(graph, static, output, features)


def _call(unet, inputs: dict) -> torch.Tensor:
    kwargs = dict(inputs)
    if "text_embeds" in kwargs:
        kwargs["added_cond_kwargs"] = {"text_embeds": kwargs.pop("text_embeds"), "time_ids": kwargs.pop("time_ids")}
    return unet(kwargs.pop("sample"), kwargs.pop("timestep"), **kwargs).sample


# --- compilation -------------------------------------------------------------------------------------------

def repeated_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """By class, or a class's subclass (FSDP2 gives each module it shards a class of its own)."""
    return [m for m in unet.modules() if any(c.__name__ in REPEATED_BLOCKS for c in type(m).__mro__)]


def compile_blocks(unets: list[torch.nn.Module], backend: str | None = None) -> None:
    """Compile each repeated block's forward with static shapes.
    The backend is Inductor, or $DMM_COMPILE_BACKEND (aot_eager, say, to tell a compiler bug from a model bug).

    Each class's forward is one code object, so its compiled graphs (one per distinct channel count, shape
    and role: a training student or an inference-mode teacher) are looked up among that class's alone."""
    blocks = [b for unet in unets for b in repeated_blocks(unet)]
    signatures = {(type(b).__name__, tuple(p.shape for p in b.parameters())) for b in blocks}
    # Every distinct block x (train, inference) x a few input shapes: allow them all, never fall back silently.
    limit = max(64, 8 * len(signatures))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           4 * limit)
    backend = backend or os.environ.get("DMM_COMPILE_BACKEND") or "inductor"
    for block in blocks:
        block.forward = torch.compile(type(block).forward.__get__(block), backend=backend, dynamic=False)


def uncompile_blocks(unets: list[torch.nn.Module]) -> None:
    for unet in unets:
        for block in repeated_blocks(unet):
            block.__dict__.pop("forward", None)


def compile_cache(unet_config: dict, device: torch.device) -> str:
    """$DMM_HOME/compile/KEY, made the compiler's cache (Inductor's graphs, AOTAutograd's and Triton's kernels).
    KEY hashes the torch version, the device and the UNet's config; within it the compiler keys each graph by
    its code and input shapes, so a second run of the same model starts warm at any batch or teacher count, and
    nothing compiled for another model, device or torch is ever read."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = json.dumps({"torch": torch.__version__, "device": name, "unet": unet_config}, sort_keys=True, default=str)
    folder = state.store("compile") / hashlib.sha256(key.encode()).hexdigest()[:16]
    folder.mkdir(exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return str(folder)


class CompileOverrun(TimeoutError):
    """The compile stage ran past train.compile_budget_s."""


class Stopwatch:
    """The compile stage's clock. While it runs (`watching`), every compiled block looks at it before it runs, so
    a compile past `budget_s` stops at the next block, not at the end of a whole shape's forward and backward."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, budget_s: float):
        self.started, self.budget_s = self.clock(), budget_s

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started

    @contextlib.contextmanager
    def watching(self, unets: list[torch.nn.Module]):
        blocks = [b for unet in unets for b in repeated_blocks(unet) if "forward" in b.__dict__]
        compiled = [b.forward for b in blocks]
        for block, forward in zip(blocks, compiled):
            block.forward = self._checked(forward)
        try:
            yield
        finally:  # the steps call the compiled forwards directly: no clock in them
            for block, forward in zip(blocks, compiled):
                block.forward = forward

    def _checked(self, forward):
        def checked(*args, **kwargs):
            if self.elapsed > self.budget_s:
                raise CompileOverrun(f"past train.compile_budget_s ({self.budget_s:g} s)")
            return forward(*args, **kwargs)
        return checked
