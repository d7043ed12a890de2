"""Which attention kernel runs: on CUDA, the fastest of SDPA's flash, cuDNN and memory-efficient kernels (and
xformers where a real op works), timed once on the model's own attention shapes, remembered under $DMM_HOME
and said on stderr. `train.attention` and `generate --attention` can force any of them."""
from __future__ import annotations

import contextlib
import functools
import json
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import console
from ..errors import BadInput
from ..files import state
from .meta import meta_inputs, meta_unet

SDPA_KERNELS = ("flash", "cudnn", "efficient")
ATTENTION_BACKENDS = ("auto", "sdpa", *SDPA_KERNELS, "xformers")
_FLAGS = {"flash": "flash_sdp", "cudnn": "cudnn_sdp", "efficient": "mem_efficient_sdp"}  # torch.backends.cuda's
_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
RECORD = "attention.json"


@functools.cache
def xformers_failure(device: str, dtype: torch.dtype) -> str | None:
    """Why xformers cannot run here, or None if a real tiny attention op just succeeded.

    Importing is not enough: PyPI builds import fine on torch versions whose CUDA kernels they cannot load.
    """
    try:
        import xformers.ops
    except Exception as e:  # any import failure means "not usable", whatever its type
        return f"cannot import xformers: {e.__class__.__name__}"
    try:
        q = torch.randn(1, 16, 2, 8, device=device, dtype=dtype)
        xformers.ops.memory_efficient_attention(q, q, q)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as e:  # same: any failure of the probe op rules xformers out
        return f"its attention op failed on {device}: {str(e).splitlines()[0]}"
    return None


def attention_shapes(unet, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(heads, query length, key length, head dim) of every distinct attention call of `unet` on latents of
    `height` x `width`, found by running a copy of it on meta tensors (no memory, no arithmetic)."""
    from diffusers.models.attention_processor import Attention

    meta = meta_unet(dict(unet.config))
    shapes = set()

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        keys = hidden.shape[1] if context is None else context.shape[1]
        shapes.add((module.heads, hidden.shape[1], keys, module.inner_dim // module.heads))

    for m in meta.modules():
        if isinstance(m, Attention):
            m.register_forward_pre_hook(record, with_kwargs=True)
    args, kwargs = meta_inputs(meta, 1, height, width)
    meta(*args, **kwargs)
    return sorted(shapes)


def _kernel_only(name: str | None) -> None:
    """Let SDPA dispatch to `name` alone (with the math kernel as the fallback for shapes it cannot take);
    None lets it choose among all of them again."""
    for kernel, flag in _FLAGS.items():
        getattr(torch.backends.cuda, f"enable_{flag}")(name is None or kernel == name)


def time_backend(name: str, shapes, batch: int, device: torch.device, dtype: torch.dtype, backward: bool,
                 repeats: int = 5) -> float | None:
    """Seconds one pass over `shapes` takes with backend `name` (forward, and backward if `backward`), or None
    where it cannot run them."""
    if name == "xformers":
        import xformers.ops

        def attend(q, k, v):
            return xformers.ops.memory_efficient_attention(*(x.transpose(1, 2) for x in (q, k, v)))
    else:
        attend = torch.nn.functional.scaled_dot_product_attention
    inputs = [[torch.randn(batch, h, n, d, device=device, dtype=dtype, requires_grad=backward)
               for n in (q_len, k_len, k_len)] for h, q_len, k_len, d in shapes]

    def one_pass():
        for q, k, v in inputs:
            out = attend(q, k, v)
            if backward:
                out.sum().backward()

    # xformers is called directly; an SDPA kernel alone, so one that cannot run fails instead of falling back
    alone = contextlib.nullcontext() if name == "xformers" else sdpa_kernel([_KERNELS[name]])
    try:
        with alone:
            one_pass()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                one_pass()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats
    except RuntimeError:
        return None


def fastest_backend(candidates, shapes, batch: int, device: torch.device, dtype: torch.dtype,
                    backward: bool) -> tuple[str, dict]:
    """The fastest candidate on these shapes, and every candidate's time (None: cannot run), remembered in
    $DMM_HOME/attention.json by torch version, device, dtype, shapes and pass."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    key = json.dumps([torch.__version__, name, str(dtype), batch, backward, sorted(candidates), shapes])
    record = state.read_record(RECORD)
    if key in record:
        return record[key]["choice"], record[key]["seconds"]
    seconds = {c: time_backend(c, shapes, batch, device, dtype, backward) for c in candidates}
    runnable = {c: s for c, s in seconds.items() if s is not None}
    choice = min(runnable, key=runnable.get) if runnable else "sdpa"
    record[key] = {"choice": choice, "seconds": seconds}
    state.write_record(RECORD, record)
    return choice, seconds


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype, *, unet=None,
                     latent_size: tuple[int, int] | None = None, batch: int = 2, backward: bool = False) -> str:
    """The attention backend to run, said once on stderr. `auto` on CUDA times the kernels on `unet`'s own
    attention shapes at `latent_size` (its default size if None); elsewhere it is PyTorch SDPA."""
    device = torch.device(device)
    if requested not in ATTENTION_BACKENDS:
        raise BadInput(f"--attention: unknown backend {requested!r} (use {', '.join(ATTENTION_BACKENDS)})")
    if requested in ("cudnn", "efficient") and device.type != "cuda":
        raise BadInput(f"--attention {requested}: that kernel runs on CUDA GPUs only; use sdpa or flash here")
    if requested == "sdpa" or requested in SDPA_KERNELS:
        _kernel_only(None if requested == "sdpa" else requested)
        console.say(f"attention: PyTorch SDPA{'' if requested == 'sdpa' else f' ({requested} kernel)'}")
        return requested
    failure = xformers_failure(str(device), dtype)
    if requested == "xformers":
        if failure is not None:
            raise BadInput(f"--attention xformers: xformers is not usable ({failure})")
        console.say("attention: xformers")
        return "xformers"
    if device.type != "cuda" or unet is None:
        _kernel_only(None)
        console.say("attention: PyTorch SDPA" + (f" (xformers not used: {failure})" if failure else ""))
        return "sdpa"
    side = latent_size or (unet.config.sample_size,) * 2
    candidates = list(SDPA_KERNELS) + ([] if failure else ["xformers"])
    try:
        choice, seconds = fastest_backend(candidates, attention_shapes(unet, *side), batch, device, dtype, backward)
    except Exception as e:  # timing is an optimisation: PyTorch's own pick is always a correct answer
        _kernel_only(None)
        console.say(f"attention: PyTorch SDPA (the kernels could not be timed: {str(e).splitlines()[0][:160]})")
        return "sdpa"
    timings = ", ".join(f"{c} {s * 1e3:.2f} ms" if s is not None else f"{c} n/a" for c, s in seconds.items())
    if choice != "xformers":
        _kernel_only(choice if choice in SDPA_KERNELS else None)
    console.say(f"attention: {choice}, the fastest on this model's attention shapes ({timings})")
    return choice


def use_attention(pipe_or_model, requested: str, device: torch.device, dtype: torch.dtype, **shape) -> str:
    """Switch a pipeline or model to the chosen backend: xformers through diffusers, an SDPA kernel by
    PyTorch's process-wide kernel switches (diffusers' default processors call SDPA)."""
    unet = getattr(pipe_or_model, "unet", pipe_or_model)
    backend = choose_attention(requested, device, dtype, unet=unet, **shape)
    if backend == "xformers":
        pipe_or_model.enable_xformers_memory_efficient_attention()
    return backend
