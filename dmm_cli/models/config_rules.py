"""What a model folder's configs must say before diffusers or transformers builds from them.

Both libraries build a part exactly as its config says before they read a weight. A config entry of the wrong
kind fails there with an unrelated message, a huge width only once it is allocated, and a scheduler entry they
do not know only at the first sampling step. So the classes model_index.json names are checked, the
shape-giving entries for kind and size, the widths and depths against the weights' headers, the scheduler's
entries against what its classes take, and the tokenizer against its text encoder.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _positive_int(value, most: int = 1 << 20) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most


def _ints(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(_positive_int(v) for v in value)


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 < value < 1


def _one_of(*allowed: str) -> tuple[str, object]:
    return "one of " + ", ".join(allowed), lambda v: v in allowed


# A latent side past 1024 is 8192 px.
UNET_ENTRIES = {
    "sample_size": ("a latent side of 1 to 1024, or two", lambda v: v is None or _positive_int(v, 1024)
                    or isinstance(v, list) and len(v) == 2 and all(_positive_int(x, 1024) for x in v)),
    "in_channels": ("a positive integer", _positive_int),
    "out_channels": ("a positive integer", _positive_int),
    "block_out_channels": ("a list of positive integers", _ints),
    "layers_per_block": ("a positive integer or a list of them", lambda v: _positive_int(v) or _ints(v)),
    "cross_attention_dim": ("a positive integer or a list of them", lambda v: _positive_int(v) or _ints(v)),
    "attention_head_dim": ("a positive integer or a list of them", lambda v: v is None or _positive_int(v) or _ints(v)),
}
# Entries that every sampler dmm offers reads the same way (a DDIM, Euler or DPM-Solver config).
SCHEDULER_ENTRIES = {
    "num_train_timesteps": ("a whole number of 1 to 100000", lambda v: _positive_int(v, 100_000)),
    "beta_start": ("a number between 0 and 1", _probability),
    "beta_end": ("a number between 0 and 1", _probability),
    "beta_schedule": _one_of("linear", "scaled_linear", "squaredcos_cap_v2"),
    "prediction_type": _one_of(*PREDICTION_TYPES),
    "timestep_spacing": _one_of("leading", "trailing", "linspace"),
    "steps_offset": ("a whole number of 0 or more", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "trained_betas": ("null or a list of numbers between 0 and 1",
                      lambda v: v is None or isinstance(v, list) and len(v) > 0 and all(_probability(b) for b in v)),
}
ENTRIES = {"unet/config.json": UNET_ENTRIES, "scheduler/scheduler_config.json": SCHEDULER_ENTRIES}

# The classes diffusers builds each part with, as model_index.json names them; the scheduler may be any of
# diffusers' (a name ending in Scheduler). Another class loads the wrong model from the part's weights, or fails
# in a library's internals.
PART_CLASSES = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
                "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
                "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast")}
PART_LIBRARIES = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers"}


def check_part_classes(path: Path, index: dict) -> None:
    """Refuse a model_index.json that names another class for a part than the one its weights are for."""
    for part, declared in index.items():
        if part in PART_CLASSES or part == "scheduler":
            library, classes = PART_LIBRARIES.get(part, "transformers"), PART_CLASSES.get(part)
            if not (isinstance(declared, list) and len(declared) == 2 and declared[0] == library
                    and (declared[1] in classes if classes else str(declared[1]).endswith("Scheduler"))):
                wanted = " or ".join(f'["{library}", "{c}"]' for c in classes or ("...Scheduler",))
                raise ModelError(f"{path}: {part} must be {wanted} (got {json.dumps(declared)[:60]})")


def check_entries(path: Path, config: dict) -> None:
    """Refuse a UNet or scheduler config (by its place in the folder) with an entry of the wrong kind or size."""
    place = f"{Path(path).parent.name}/{Path(path).name}"
    for key, (what, ok) in ENTRIES.get(place, {}).items():
        if key in config and not ok(config[key]):
            raise ModelError(f"{path}: {key} must be {what} (got {json.dumps(config[key])[:60]})")
    if place == "scheduler/scheduler_config.json":
        steps, betas = config.get("num_train_timesteps", 1000), config.get("trained_betas")
        if config.get("steps_offset", 0) >= steps:
            raise ModelError(f"{path}: steps_offset {config['steps_offset']} is not below num_train_timesteps {steps}")
        if betas is not None and len(betas) != steps:
            raise ModelError(f"{path}: trained_betas has {len(betas)} values for num_train_timesteps {steps}")


_TEXT_WIDTHS = (("vocab_size", "embeddings.token_embedding.weight", 0),
                ("hidden_size", "embeddings.token_embedding.weight", 1),
                ("max_position_embeddings", "embeddings.position_embedding.weight", 0),
                ("intermediate_size", "encoder.layers.0.mlp.fc1.weight", 0),
                ("num_hidden_layers", "encoder.layers.{i}.", None))
# Where a part's shape-giving entries show in its weights: (entry, weight name, the dimension that holds it, or
# None for a count of numbered layers).
WIDTHS = {
    "unet": (("in_channels", "conv_in.weight", 1), ("out_channels", "conv_out.weight", 0),
             ("block_out_channels", "down_blocks.{i}.resnets.0.conv1.weight", 0),
             ("layers_per_block", "down_blocks.0.resnets.{i}.", None)),
    "vae": (("in_channels", "encoder.conv_in.weight", 1), ("out_channels", "decoder.conv_out.weight", 0),
            ("latent_channels", "post_quant_conv.weight", 0),
            ("block_out_channels", "encoder.down_blocks.{i}.resnets.0.conv1.weight", 0)),
    "text_encoder": _TEXT_WIDTHS,
    "text_encoder_2": _TEXT_WIDTHS,
}


def _found(shapes: dict[str, list[int]], name: str) -> list[int] | None:
    """A weight's shape by its name, whatever prefix the saving library gave it (text_model. or none)."""
    return next((shape for key, shape in shapes.items() if key == name or key.endswith("." + name)), None)


def _layer_count(shapes: dict[str, list[int]], prefix: str) -> int:
    """How many numbered layers `prefix` ("encoder.layers.") holds in the weights."""
    return len({key.split(prefix)[1].split(".")[0] for key in shapes if key.startswith(prefix) or "." + prefix in key})


def check_matches_weights(path: Path, config: dict, shapes: dict[str, list[int]]) -> None:
    """Refuse a part's config (`path`, in the part's folder) that describes other widths or depths than its
    weights (`shapes`, from their headers) have."""
    for key, weight, dim in WIDTHS.get(Path(path).parent.name, ()):
        wanted = config.get(key)
        if wanted is None:
            continue
        if dim is None:
            has, wanted = _layer_count(shapes, weight.split("{i}")[0]), wanted[0] if isinstance(wanted, list) else wanted
            if has and wanted != has:
                raise ModelError(f"{path}: {key} is {wanted}, but its weights have {has}")
            continue
        for i, width in enumerate(wanted if isinstance(wanted, list) else [wanted]):
            shape = _found(shapes, weight.format(i=i))
            if shape is not None and len(shape) > dim and shape[dim] != width:
                which = f"{key}[{i}]" if isinstance(wanted, list) else key
                raise ModelError(f"{path}: {which} is {width}, but its weights have {shape[dim]} ({weight.format(i=i)})")


def check_tokenizer(tokenizer: Path, config: dict | None, encoder_config: dict | None) -> None:
    """Refuse a tokenizer folder that transformers would load into a broken tokenizer: without its vocabulary, or
    padding prompts to more tokens than its text encoder has positions (transformers' default, when the config does
    not say, is 10³⁰ tokens, which overflows; 10⁹ exhausts the memory)."""
    if not (tokenizer / "tokenizer.json").is_file() and not all((tokenizer / f).is_file()
                                                                 for f in ("vocab.json", "merges.txt")):
        raise ModelError(f"{tokenizer}: has neither tokenizer.json nor vocab.json and merges.txt")
    if config is None:
        raise ModelError(f"{tokenizer}: has no tokenizer_config.json to say how many tokens a prompt takes")
    length = config.get("model_max_length")
    positions = (encoder_config or {}).get("max_position_embeddings", 1 << 20)
    if not _positive_int(length, positions):
        raise ModelError(f"{tokenizer / 'tokenizer_config.json'}: model_max_length must be a whole number of 1 to "
                         f"{positions}, the text encoder's positions (got {json.dumps(length)[:60]})")


def check_float_weights(part: Path, tensors: dict[str, dict]) -> None:
    """Refuse a part whose weights or biases (header entries) are integers or booleans: diffusers casts them to the
    model's dtype without a word, drawing noise or NaN. Other tensors may be integer buffers (CLIP's position_ids,
    counters), which merges copy."""
    for name, entry in tensors.items():
        if name.endswith((".weight", ".bias")) and not entry["dtype"].startswith(("F", "BF")):
            raise ModelError(f"{part}: tensor {name} is {entry['dtype']}; a model's weights must be floating point")
