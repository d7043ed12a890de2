"""Single-file checkpoints (the A1111 / ComfyUI layout) to and from diffusers folders, offline.

Import goes through diffusers' own `from_single_file`, pointed at component configs that ship with
dmm (or a plug-in's), so nothing is fetched. Export writes the original Stable Diffusion key names
(SD2.x's text encoder in OpenCLIP's layout, which A1111 and ComfyUI recognise SD2 by); a DMM
student's style MLP goes to `label_emb.0.*`, where LDM-style UNets keep class embeddings, so a
student round-trips. dmm's own files carry every component's config, the scheduler's included, and
an import keeps each component's stored dtype. A foreign SD2.x file says what it predicts through a
`.yaml` config beside it (A1111's convention) or `--prediction-type`.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import console, plugins
from ..errors import ModelError
from ..files.atomic import atomic_file, atomic_folder
from ..files.safetensors_header import read_header
from ..files.safetensors_io import read_component
from ..files.text import read_json
from .folders import is_open_clip

UNET_PREFIX = "model.diffusion_model."
FIRST_UNET_WEIGHT = UNET_PREFIX + "input_blocks.0.0.weight"  # an SD UNet's, not SD3's or Flux's transformer
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
XL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
CONFIGS = Path(__file__).parent / "configs"
OFFICIAL_MODULES = ("model_embedding", "add_embedding")  # the released DMM UNet's style table and its MLP

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{_RESNET[name]}.{tail}"


def unet_key(key: str, config: dict) -> str:
    """The original Stable Diffusion name of a diffusers UNet2DConditionModel tensor."""
    per = config["layers_per_block"] + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for src, dst in fixed.items():
        if key.startswith(src + "."):
            return dst + key[len(src):]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + i * per + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = i * per + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        has_attention = "CrossAttn" in config["up_block_types"][i]
        return f"output_blocks.{i * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ModelError(f"unet tensor {key} has no single-file name (unsupported UNet layout)")


def vae_key(key: str, config: dict) -> str:
    """The original Stable Diffusion name of a diffusers AutoencoderKL tensor."""
    levels = len(config["block_out_channels"])
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        name, _, tail = m[2].rpartition(".")
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION.get(name, name)}.{tail}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key


def open_clip_tensors(text: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's tensors (without `text_model.`) under OpenCLIP's names, q/k/v fused as `in_proj`."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {"token_embedding.weight": text["embeddings.token_embedding.weight"],
           "positional_embedding": text["embeddings.position_embedding.weight"],
           "ln_final.weight": text["final_layer_norm.weight"], "ln_final.bias": text["final_layer_norm.bias"]}
    for i in range(config["num_hidden_layers"]):
        layer = f"encoder.layers.{i}."
        block = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{block}attn.in_proj_{kind}"] = torch.cat([text[f"{layer}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in names.items():
                out[f"{block}{theirs}.{kind}"] = text[f"{layer}{ours}.{kind}"]
    return out


def export_single_file(folder: Path, path: Path, dtype: torch.dtype | None = None, *,
                       unet: tuple[dict[str, torch.Tensor], dict] | None = None,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write an SD1.x/2.x/SDXL diffusers folder (a DMM student included) as one original-layout .safetensors file.

    `unet` (weights, config) stands in for the folder's own UNet (a style baked in); `metadata` is added."""
    index = read_json(folder / "model_index.json")
    if index.get("_class_name") not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ModelError(f"{folder}: only Stable Diffusion 1.x/2.x/XL pipelines can be exported as one file")
    xl = index["_class_name"] == "StableDiffusionXLPipeline"
    out: dict[str, torch.Tensor] = {}
    unet_weights, unet_config = unet or (read_component(folder / "unet"), read_json(folder / "unet" / "config.json"))
    if xl and any(key.startswith("class_embedding.") for key in unet_weights):
        raise ModelError(f"{folder}: an SDXL student goes into one file a style at a time (export --style): the "
                         "file's label_emb is SDXL's text-time embedding, with no room for a style embedding")
    official = unet_config.get("addition_embed_type") == "model_merge"  # the released DMM UNet
    for key, tensor in unet_weights.items():
        verbatim = official and key.split(".")[0] in OFFICIAL_MODULES
        out[UNET_PREFIX + (key if verbatim else unet_key(key, unet_config))] = tensor
    vae_config = read_json(folder / "vae" / "config.json")
    for key, tensor in read_component(folder / "vae").items():
        if ".mid_block.attentions." in key and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # original VAE attention uses 1×1 convolutions
        out[VAE_PREFIX + vae_key(key, vae_config)] = tensor
    text_config = read_json(folder / "text_encoder" / "config.json")
    text = {k.removeprefix("text_model."): v for k, v in read_component(folder / "text_encoder").items()}
    if is_open_clip(text_config) and not xl:
        out.update({OPEN_CLIP_PREFIX + k: v for k, v in open_clip_tensors(text, text_config).items()})
    else:  # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level; single files keep it
        prefix = XL_TEXT_PREFIX if xl else TEXT_PREFIX
        out.update({f"{prefix}text_model.{k}": v for k, v in text.items()})
    if xl:  # SDXL's second encoder is OpenCLIP's, its projection stored transposed
        text_2_config = read_json(folder / "text_encoder_2" / "config.json")
        text_2 = {k.removeprefix("text_model."): v for k, v in read_component(folder / "text_encoder_2").items()}
        out.update({XL_OPEN_CLIP_PREFIX + k: v for k, v in open_clip_tensors(text_2, text_2_config).items()})
        out[XL_OPEN_CLIP_PREFIX + "text_projection"] = text_2["text_projection.weight"].T
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    # The diffusers configs travel along, so a re-import rebuilds exactly this model (a toy or a student too).
    configs = {part: read_json(folder / part / "config.json")
               for part in ("vae", "text_encoder", "text_encoder_2") if (folder / part / "config.json").is_file()}
    configs["scheduler"] = read_json(folder / "scheduler" / "scheduler_config.json")
    metadata = {"dmm.source": folder.name, "dmm.configs": json.dumps({"unet": unet_config, **configs}),
                **(metadata or {})}
    styles = folder / "styles.json"
    if styles.is_file() and unet is None:
        metadata["dmm.styles"] = styles.read_text(encoding="utf-8")
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata=metadata)
    return path


COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model.",
                      "text_encoder_2": "conditioner.embedders.1."}
STORED = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _inspect(path: Path) -> tuple[str, dict[str, torch.dtype]]:
    """The checkpoint's family (sd15, sd2 or sdxl) and the dtype each component is stored in."""
    header = read_header(path)
    if not any(k.startswith(UNET_PREFIX) for k in header):
        lora = any(".lora_" in k or "lora_A" in k or "lora_down" in k for k in header)
        hint = "; it holds LoRA weights: give it with --lora, or as MODEL+LORA" if lora else ""
        raise ModelError(f"{path}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* tensors){hint}")
    if FIRST_UNET_WEIGHT not in header:
        raise ModelError(f"{path}: its {UNET_PREFIX}* tensors are not a Stable Diffusion 1.x/2.x/XL UNet (no "
                         "input_blocks)")
    if any(k.startswith("conditioner.embedders.1") for k in header):
        kind, prefixes = "sdxl", dict(COMPONENT_PREFIXES, text_encoder="conditioner.embedders.0.")
    else:
        kind = "sd2" if OPEN_CLIP_PREFIX + "token_embedding.weight" in header else "sd15"
        prefixes = {part: prefix for part, prefix in COMPONENT_PREFIXES.items() if part != "text_encoder_2"}
    dtypes = {}
    for part, prefix in prefixes.items():
        entries = [v for k, v in header.items() if k.startswith(prefix)]
        if not entries:  # diffusers fails on it only deep inside from_single_file
            raise ModelError(f"{path}: holds no {part} weights ({prefix}*); dmm reads whole checkpoints, with the "
                             "UNet, VAE and text encoder" + ("s" if kind == "sdxl" else "") + " in one file")
        stored = [STORED[v["dtype"]] for v in entries if v["dtype"] in STORED]
        if stored:
            dtypes[part] = max(stored, key=lambda d: d.itemsize)
    return kind, dtypes


CONFIG_TEMPLATES: list[tuple[Callable[[dict], bool], Callable[[], Path]]] = []


def register_config_template(matches: Callable[[dict], bool], folder: Callable[[], Path]) -> None:
    """Import files whose `dmm.configs` metadata `matches` with the pipeline folder `folder()` as the template
    (for tokenizers and configs that are not Stable Diffusion's own, as a plug-in's models have)."""
    CONFIG_TEMPLATES.append((matches, folder))


def prediction_from_yaml(path: Path) -> str | None:
    """What a foreign file predicts, from the LDM `.yaml` config A1111 keeps beside it, if there is one."""
    import yaml

    config_file = path.with_suffix(".yaml")
    if not config_file.is_file():
        return None
    try:
        params = yaml.safe_load(config_file.read_text(encoding="utf-8"))["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{config_file}: not an LDM model config (model.params)") from None
    return "v_prediction" if params.get("parameterization") == "v" else "epsilon"


def _config_folder(kind: str, metadata: dict, prediction_type: str | None, path: Path, workdir: Path) -> Path:
    """Component configs for the import: shipped SD ones, or a plug-in's, updated from the file's own metadata
    (every config, the scheduler's included, for files dmm wrote) and the prediction type."""
    configs = json.loads(metadata.get("dmm.configs", "{}"))
    plugins.load()
    template = next((folder() for matches, folder in CONFIG_TEMPLATES if matches(configs)), CONFIGS / kind)
    prediction_type = prediction_type or prediction_from_yaml(path)
    if kind == "sd2" and "scheduler" not in configs and prediction_type is None:
        raise ModelError(f"{path}: an SD2.x checkpoint may predict epsilon (512 px models) or v (768 px): say which "
                         f"with --prediction-type, or put its .yaml config beside it")
    folder = workdir / "config"
    shutil.copytree(template, folder, symlinks=False, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    scheduler = configs.pop("scheduler", None) or read_json(folder / "scheduler" / "scheduler_config.json")
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler), encoding="utf-8")
    index = read_json(folder / "model_index.json")
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    for part, config in configs.items():
        (folder / part / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def convert_to_diffusers(path: Path, folder: Path, prediction_type: str | None = None) -> Path:
    """Convert a single-file SD1.x, SD2.x or SDXL checkpoint to a diffusers folder using shipped configs only;
    each component keeps the dtype it is stored in."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    console.quiet_loading()  # dmm says what it converts; diffusers' own loading and writing bars stay out
    kind, dtypes = _inspect(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    widest = max(dtypes.values(), key=lambda d: d.itemsize)  # loaded in the widest, each then cast back: exact
    official = UNET_PREFIX + "model_embedding.weight" in read_header(path)
    with atomic_folder(folder, keep_existing=True) as tmp, tempfile.TemporaryDirectory() as work:
        config = _config_folder(kind, metadata, prediction_type, path, Path(work))
        if official:  # diffusers builds the plain UNet; the style table and its MLP are added after
            unet_config = read_json(config / "unet" / "config.json")
            for key in ("addition_embed_type", "num_models", "_class_name"):
                unet_config.pop(key, None)
            (config / "unet" / "config.json").write_text(json.dumps(unet_config), encoding="utf-8")
        try:
            pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=widest,
                                        **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"{path}: cannot convert this checkpoint ({str(e).splitlines()[0]})") from e
        table = None
        if official:
            pipe.unet, table = _official_student(pipe.unet, path, metadata)
        for part, dtype in dtypes.items():
            getattr(pipe, part).to(dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if table is not None:
            (tmp / "styles.json").write_text(table.to_json(), encoding="utf-8")
        elif "dmm.styles" in metadata:
            (tmp / "styles.json").write_text(metadata["dmm.styles"], encoding="utf-8")
    return folder


def _official_student(unet, path: Path, metadata: dict):
    """The student of a released-layout file (the ComfyUI-DMM nodes'): its 8-row style table and MLP become the
    student's style MLP, exactly (models/official.py). A file dmm wrote names its styles, and the rows past
    them, zero padding, are dropped; another file's 8 rows become styles style-0 to style-7."""
    from .official import convert_unet
    from .student import make_student
    from .styles import Style, StyleTable

    with safe_open(str(path), framework="pt") as handle:
        names = ["model_embedding.weight", *(f"add_embedding.linear_{i}.{kind}" for i in (1, 2)
                                             for kind in ("weight", "bias"))]
        tensors = {name: handle.get_tensor(UNET_PREFIX + name) for name in names}
    known = StyleTable.from_json(metadata["dmm.styles"], path) if "dmm.styles" in metadata else None
    rows = len(tensors["model_embedding.weight"])
    count = len(known.names) if known is not None and len(known.names) <= rows else rows
    tensors["model_embedding.weight"] = tensors["model_embedding.weight"][:count]
    weights, _ = convert_unet(tensors, {})
    student = make_student(unet, count)
    student.load_state_dict({**unet.state_dict(), **{k: v.to(unet.dtype) for k, v in weights.items()}})
    table = known if known is not None and count == len(known.names) else StyleTable(
        [Style(f"style-{i}", path.name) for i in range(count)],
        lineage=[{"converted_from": "MCG-NJU/DMM official layout, one file", "source": path.name}])
    return student, table
