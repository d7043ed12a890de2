"""LoRA adapters as styles: `MODEL+LORA[:SCALE]+...` is MODEL with each LoRA's low-rank update added.

A LoRA comes from anywhere a model does (a plug-in scheme, a local file or folder, the Hub: pinned and
sha256-checked, pickles refused unless allowed) in any format diffusers' own loader reads: kohya/A1111
single files, diffusers/PEFT `pytorch_lora_weights.safetensors`, PEFT adapter folders. It is turned into
one table of (down, up) pairs per layer with its α/r folded into `up`, and checked against the model it is
for. The table gives each weight's update scale·up·down one tensor at a time: fused once into a loaded
model, written once as a fused folder (what distill and eval load), or streamed into weight-space merges.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import console
from ..errors import BadInput, ModelError
from ..files import state
from ..files.atomic import atomic_file, atomic_folder
from ..files.hashing import cached_sha256, component_sha256
from ..files.safetensors_header import component_shapes, read_header, weight_files
from ..files.safetensors_io import TORCH_DTYPES, StreamingWriter, TensorReader, check_finite
from ..files.text import read_json
from .folders import (PICKLE_SUFFIXES, check_pipeline_folder, copy_part, derived_model_index, model_family,
                      model_root, reusable)
from .hub import Fetched
from .single_file import FIRST_UNET_WEIGHT
from .references import HUB_REF, SCHEMES, fetch, resolve as resolve_model, scheme_of
from .references import shareable as shareable_model

PARTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}  # by the width the cross-attention reads


@dataclass(frozen=True)
class LoraSpec:
    ref: str
    scale: float = 1.0

    def __str__(self) -> str:  # parses back, also inside MODEL+LORA:SCALE, so never a "+" in the exponent
        return f"{self.ref}:{self.scale!r}".replace("e+", "e")


def parse_lora(text: str, where: str = "--lora") -> LoraSpec:
    """`REF[:SCALE]`; a plug-in reference (toy:night-lora) keeps its colon."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or (":" not in head and scheme_of(text) == head):
        return LoraSpec(text)
    try:
        scale = float(tail)
    except ValueError:
        raise BadInput(f"{where} {text!r}: the scale {tail!r} is not a number") from None
    if not math.isfinite(scale) or scale < 0:
        raise BadInput(f"{where} {text!r}: the scale must be a finite number >= 0 (got {tail})")
    return LoraSpec(head, scale)


def split_ref(ref: str) -> tuple[str, list[LoraSpec]]:
    """`MODEL+LORA[:SCALE]+...` into the model's reference and its LoRAs (none for a plain reference)."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, []
    model, *loras = ref.split("+")
    if not model or not all(loras):
        raise BadInput(f"{ref}: expected MODEL+LORA[:SCALE]+LORA[:SCALE]...")
    return model, [parse_lora(text, ref) for text in loras]


def shareable(ref: str) -> str:
    """`MODEL+LORA[:SCALE]+...` as files meant for sharing name it: each model by references.shareable."""
    model, loras = split_ref(ref)
    return shareable_model(model) + "".join(f"+{shareable_model(x.ref)}:{x.scale!r}" for x in loras)


# -- fetching ---------------------------------------------------------------------------------------------------

def _pick(names: list[str], ref: str, allow_pickle: bool) -> list[str]:
    """The files of a LoRA repo to fetch: its diffusers file, its PEFT adapter, or its one weights file."""
    if DIFFUSERS_FILE in names:
        return [DIFFUSERS_FILE]
    if all(f in names for f in PEFT_FILES):
        return list(PEFT_FILES)
    singles = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    if len(singles) > 1:
        raise BadInput(f"{ref}: the repo holds {len(singles)} .safetensors files; name one, e.g. {ref}/{singles[0]}")
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and "/" not in n]
    if not singles and pickles and not allow_pickle:
        raise BadInput(f"{ref}: the repo has only pickle weights ({pickles[0]}), which can run code when loaded; "
                       "pass --allow-pickle to load them with weights_only=True")
    return singles or pickles[:1]


def fetch_lora(ref: str, allow_pickle: bool = False) -> Path:
    """The local safetensors file (or folder) of a LoRA reference, downloading and verifying what is missing."""
    scheme = scheme_of(ref)
    local = Path(ref).expanduser()
    if scheme is not None:
        path = SCHEMES[scheme].folder(ref[len(scheme) + 1:])
    elif local.exists():
        path = local
    else:
        path = _fetch_hub_lora(ref, allow_pickle)
    return _unpickled(path, allow_pickle) if path.suffix.lower() in PICKLE_SUFFIXES else path


def _fetch_hub_lora(ref: str, allow_pickle: bool) -> Path:
    from .hub import fetch_files

    match = HUB_REF.match(ref)
    if match is None or ref.startswith((".", "/", "~")) or ".." in ref.split("/"):
        raise BadInput(f"{ref}: no such LoRA file or folder, and not a Hub reference (org/name[@revision][/file])")
    path = match["path"]
    choose = (lambda names: [path] if path in names else []) if path else (lambda n: _pick(n, ref, allow_pickle))
    patterns = [path] if path else ["*.safetensors", *PEFT_FILES, *(f"*{s}" for s in PICKLE_SUFFIXES)]
    folder = fetch_files(ref, match["repo"], match["rev"], choose, patterns, "no LoRA weights in the repo")
    if path:
        return folder / path
    chosen = _pick([p.name for p in folder.iterdir()], ref, allow_pickle)  # what came, or the cache held
    if not chosen:
        raise BadInput(f"{ref}: no LoRA weights in the cached repo")
    return folder if chosen[0] == PEFT_FILES[0] else folder / chosen[0]


# -- reading ----------------------------------------------------------------------------------------------------

def _tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: not a LoRA (.safetensors file, or a folder with {DIFFUSERS_FILE} or "
                         f"{PEFT_FILES[0]})")
    read_header(path)  # a checked header before safetensors reads it
    from safetensors.torch import load_file

    tensors = load_file(path)
    for name, tensor in tensors.items():  # a LoRA is small: every tensor is checked, alphas included
        check_finite(tensor, path, name)
    return tensors


def _unpickled(path: Path, allow_pickle: bool) -> Path:
    """A pickle LoRA loaded with weights_only=True and kept as safetensors (once, by content hash)."""
    if not allow_pickle:
        raise BadInput(f"{path}: a pickle LoRA can run code when loaded; convert it to .safetensors or pass "
                       "--allow-pickle")
    target = state.home() / "converted" / f"{cached_sha256(path)[:24]}-lora.safetensors"
    if not target.is_file():
        from safetensors.torch import save_file

        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any unpickling failure: not a plain tensor dict
            raise ModelError(f"{path}: not a LoRA state dict ({e.__class__.__name__})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise ModelError(f"{path}: not a LoRA state dict (expected a mapping of names to tensors)")
        state.store("converted")
        with atomic_file(target) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    return target


def _peft_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """A PEFT `save_pretrained` folder, as diffusers-format keys with α/r folded into lora_B."""
    try:
        config = read_json(folder / PEFT_FILES[1])
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ModelError(f"{folder / PEFT_FILES[1]}: not a PEFT LoRA config (it needs r and lora_alpha)") from None
    if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ModelError(f"{folder}: a DoRA adapter or one with per-layer ranks or alphas, which dmm does not read")
    factor = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    out = {}
    for key, tensor in _tensors(folder / PEFT_FILES[0]).items():
        key = key.removeprefix("base_model.model.")
        part = "text_encoder" if key.startswith("text_model.") else "unet"
        out[f"{part}.{key}"] = tensor * factor if ".lora_B." in key else tensor
    return out


def _fold_alphas(raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """kohya's per-layer α folded into lora_up as α/rank, so every layer's update is plainly up·down."""
    out = dict(raw)
    for key in [k for k in raw if k.endswith(".alpha")]:
        stem = key[:-len(".alpha")]
        down, up = f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"
        if down not in raw or up not in raw:
            raise ModelError(f"{path}: {key} belongs to no lora_down/lora_up pair")
        out[up] = raw[up].float() * (float(raw[key]) / raw[down].shape[0])
        del out[key]
    return out


def _layer_table(raw: dict[str, torch.Tensor], path: Path, pipeline_cls, unet_config) -> dict[str, dict]:
    """part -> layer -> (down, up), read by diffusers' own converters from any format they know."""
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in raw):
        raise ModelError(f"{path}: a DoRA adapter, which dmm does not read (plain LoRAs only)")
    from diffusers.configuration_utils import FrozenDict

    # SDXL kohya files name UNet blocks the original way; diffusers maps them with the UNet's config.
    kwargs = {"unet_config": FrozenDict(unet_config)} if pipeline_cls.__name__ == "StableDiffusionXLPipeline" else {}
    try:
        converted, _ = pipeline_cls.lora_state_dict(_fold_alphas(raw, path), **kwargs)
        table = {}
        for part in PARTS:
            sub = {k[len(part) + 1:]: v for k, v in converted.items() if k.startswith(part + ".")}
            if part == "unet":  # the oldest diffusers files name UNet layers without a prefix
                sub.update({k: v for k, v in converted.items() if not k.startswith(PARTS)})
            if not sub:
                continue
            if part == "unet":
                sub = convert_unet_state_dict_to_peft(sub)
            else:
                old = any("_lora.down." in k or "_lora.up." in k for k in sub)
                sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
                    sub, original_type=StateDictType.DIFFUSERS_OLD if old else None))
            layers: dict[str, dict] = {}
            for key, tensor in sub.items():
                layer, sep, which = key.rpartition(".lora_")
                if not sep or which not in ("A.weight", "B.weight"):
                    raise ModelError(f"{path}: {part}.{key} is not a LoRA down or up weight")
                layers.setdefault(layer, {})["down" if which[0] == "A" else "up"] = tensor
            table[part] = layers
    except ModelError:
        raise
    except (ValueError, KeyError, RuntimeError) as e:  # diffusers' converters reject what they cannot read
        raise ModelError(f"{path}: not a LoRA diffusers can read ({str(e).splitlines()[0][:200]})") from None
    if not table:
        raise ModelError(f"{path}: holds no LoRA layers")
    return table


def _bias_updates(raw: dict[str, torch.Tensor], path: Path, unet_shapes: dict) -> tuple[dict, dict]:
    """The UNet bias and whole-weight differences a LoRA carries (kohya's `<layer>.diff_b` and `<layer>.diff`,
    LyCORIS' norm `<layer>.w_norm` and `.b_norm`, PEFT's `<layer>.lora_B.bias`), taken out of `raw` by the UNet
    weight they add to; all-zero ones are dropped. diffusers' converters skip the kohya and LyCORIS ones."""
    kohya = {}
    for name in unet_shapes:
        layer, kind = name.rsplit(".", 1)
        for suffix in {"bias": ("diff_b", "b_norm"), "weight": ("diff", "w_norm")}.get(kind, ()):
            kohya[f"{layer.replace('.', '_')}.{suffix}"] = name
    rest, biases = {}, {}
    for key, tensor in raw.items():
        if key.endswith((".diff_b", ".diff", ".w_norm", ".b_norm")) and key.startswith("lora_unet_"):
            name = kohya.get(key[len("lora_unet_"):])
        elif key.endswith(".lora_B.bias"):
            name = key.removeprefix("unet.").removesuffix(".lora_B.bias") + ".bias"
        else:
            rest[key] = tensor
            continue
        if not tensor.any():
            continue
        if name is None or list(unet_shapes.get(name, [])) != list(tensor.shape):
            raise ModelError(f"{path}: its difference {key} fits no weight or bias of the model's UNet")
        biases[name] = tensor.float()
    return rest, biases


def _lora_family(table: dict) -> str | None:
    """SDXL if it has a second text encoder's layers, else by the width its cross-attention reads (None: unknown)."""
    if "text_encoder_2" in table:
        return "SDXL"
    widths = {pair["down"].shape[1] for layer, pair in table.get("unet", {}).items()
              if layer.endswith("attn2.to_k") and "down" in pair}
    return next((FAMILIES[w] for w in widths if w in FAMILIES), None)


@dataclass(frozen=True)
class Lora:
    spec: LoraSpec
    sha256: str
    updates: dict  # part -> weight name in the model's files -> (down, up)

    @property
    def layers(self) -> int:
        return sum(len(u) for u in self.updates.values())


def _digest(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return hashlib.sha256("".join(cached_sha256(f) for f in files).encode()).hexdigest()


def load_lora(spec: LoraSpec, model: Path, model_ref: str, allow_pickle: bool = False) -> Lora:
    """Fetch, read and check one LoRA against the model folder it is for (every layer must land on a weight of
    the same size)."""
    from .pipeline import pipeline_class

    path = fetch_lora(spec.ref, allow_pickle)
    if path.is_dir():
        if (path / DIFFUSERS_FILE).is_file():
            raw = _tensors(path / DIFFUSERS_FILE)
        elif all((path / f).is_file() for f in PEFT_FILES):
            raw = _peft_adapter(path)
        elif (path / "model_index.json").is_file():
            raise ModelError(f"{spec.ref}: is a whole model, not a LoRA; give it as the model")
        else:
            raise ModelError(f"{path}: no LoRA weights ({DIFFUSERS_FILE}, or {' and '.join(PEFT_FILES)})")
    else:
        raw = _tensors(path)
        if FIRST_UNET_WEIGHT in raw:
            raise ModelError(f"{spec.ref}: is a whole checkpoint, not a LoRA; give it as the model")
    unet_config = read_json(model / "unet" / "config.json")
    raw, biases = _bias_updates(raw, path, component_shapes(model / "unet"))
    table = _layer_table(raw, path, pipeline_class(model), unet_config)
    theirs, ours = _lora_family(table), model_family(model)
    if theirs is not None and theirs != ours:
        raise BadInput(f"{spec.ref}: a LoRA for {theirs} models cannot apply to {model_ref}, an {ours} model")
    total = sum(len(layers) for layers in table.values())
    updates, unmatched = {}, []
    for part, layers in table.items():
        shapes = component_shapes(model / part) if (model / part).is_dir() else {}
        for layer, pair in layers.items():
            name = next((n for n in (f"{layer}.weight", f"text_model.{layer}.weight",
                                     f"{layer.removeprefix('text_model.')}.weight") if n in shapes), None)
            if name is None or len(pair) != 2:
                unmatched.append(f"{part}.{layer}")
                continue
            down, up = pair["down"], pair["up"]
            if up.flatten(1).shape[1] != down.shape[0]:
                raise BadInput(f"{spec.ref}: its layer {part}.{layer} pairs a down of rank {down.shape[0]} with an up "
                               f"of rank {up.flatten(1).shape[1]}")
            if up.shape[0] != shapes[name][0] or up.shape[0] * down[0].numel() != math.prod(shapes[name]):
                raise BadInput(f"{spec.ref}: its layer {part}.{layer} does not fit {model_ref} "
                               f"({list(up.shape[:1]) + list(down.shape[1:])} against {shapes[name]}): a LoRA for "
                               "another model family")
            updates.setdefault(part, {})[name] = (down, up)
    if unmatched:
        raise BadInput(f"{spec.ref}: {total - len(unmatched)} of its {total} LoRA layers match a layer of "
                       f"{model_ref} (the first that does not: {unmatched[0]})")
    for name, bias in biases.items():  # a whole difference as a rank-1 pair, so every user of the table adds it alike
        updates.setdefault("unet", {})[name] = (torch.ones(1, 1), bias.reshape(-1, 1))
    return Lora(spec, _digest(path), updates)


def load_loras(specs: list[LoraSpec], model: Path, model_ref: str, allow_pickle: bool = False) -> list[Lora]:
    loras = [load_lora(s, model, model_ref, allow_pickle) for s in specs]
    for lora in loras:
        console.say(f"lora: {lora.spec.ref} at scale {lora.spec.scale:g}: {lora.layers} layers")
    return loras


# -- applying ---------------------------------------------------------------------------------------------------

def parts_changed(loras: list[Lora]) -> set[str]:
    return {part for lora in loras for part in lora.updates}


def delta(loras: list[Lora], part: str, name: str, shape) -> torch.Tensor | None:
    """Σ scale·up·down for one weight, in fp32, or None when no LoRA touches it."""
    total = None
    for lora in loras:
        pair = lora.updates.get(part, {}).get(name)
        if pair is None or lora.spec.scale == 0:
            continue
        down, up = pair
        update = (up.flatten(1).float() @ down.flatten(1).float()).reshape(shape) * lora.spec.scale
        total = update if total is None else total + update
    return total


def _fused(weight: torch.Tensor, update: torch.Tensor, part: str, name: str, loras: list[Lora]) -> torch.Tensor:
    """weight + update, in the weight's dtype. A sum past the dtype's range (a huge scale) is named here; drawn,
    it would only show as NaN pictures blamed on the model."""
    out = (weight.float() + update.to(weight.device)).to(weight.dtype)
    if not torch.isfinite(out).all() and torch.isfinite(weight).all():
        given = ", ".join(str(lora.spec) for lora in loras if name in lora.updates.get(part, {}))
        raise BadInput(f"{given}: fused into {part}.{name}, the update overflows "
                       f"{str(weight.dtype).removeprefix('torch.')}; use a smaller scale")
    return out


@torch.no_grad()
def fuse(module: torch.nn.Module, part: str, loras: list[Lora]) -> None:
    """Add the LoRAs' updates into a loaded component's weights, once."""
    params = dict(module.named_parameters())
    for name in {name for lora in loras for name in lora.updates.get(part, {})}:  # as the model's files name them
        param = next((params[n] for n in (name, name.removeprefix("text_model."), f"text_model.{name}")
                      if n in params), None)
        if param is None:  # a name the files use but the loaded class does not: fail loudly, never skip
            owner = next(lora.spec.ref for lora in loras if name in lora.updates.get(part, {}))
            raise ModelError(f"{owner}: no weight {part}.{name} in the loaded model")
        update = delta(loras, part, name, param.shape)
        if update is not None:
            param.copy_(_fused(param, update, part, name, loras))


def fuse_pipeline(pipe, loras: list[Lora]) -> None:
    for part in parts_changed(loras):
        fuse(getattr(pipe, part), part, loras)


def _fuse_part(source: Path, target: Path, part: str, loras: list[Lora]) -> None:
    """One component's files rewritten tensor by tensor with the LoRAs' updates added, in their stored dtypes."""
    copy_part(source, target, model_root(source), skip=(".safetensors",))
    for f in weight_files(source):
        reader = TensorReader(f)
        try:
            specs = {n: (TORCH_DTYPES[e["dtype"]], e["shape"]) for n, e in reader.header.items()}
            with open(target / f.name, "wb") as out:
                writer = StreamingWriter(out, specs, {"dmm.loras": json.dumps([str(x.spec) for x in loras])})
                for name, (dtype, shape) in specs.items():
                    tensor = reader.get(name)
                    update = delta(loras, part, name, shape)
                    writer.write(name, tensor if update is None else _fused(tensor, update, part, name, loras))
        finally:
            reader.close()


def fused_folder(model: Path, loras: list[Lora]) -> Path:
    """The model with its LoRAs fused, written once under $DMM_HOME/fused and reused, so a LoRA teacher loads and
    runs like a full one."""
    key = json.dumps({"model": str(model.resolve()),
                      "weights": {p: component_sha256(model / p) for p in PARTS if (model / p).is_dir()},
                      "loras": [[lora.sha256, lora.spec.scale] for lora in loras]}, sort_keys=True)
    folder = state.home() / "fused" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if reusable(folder, "the fused LoRA model"):
        return folder
    state.store("fused")
    console.say(f"lora: fusing {len(loras)} LoRA(s) into {model} once (cached in {folder})")
    changed = parts_changed(loras)
    with atomic_folder(folder, keep_existing=True) as tmp:
        for part in sorted(p for p in model.iterdir() if p.is_dir()):
            if part.name in changed:
                _fuse_part(part, tmp / part.name, part.name, loras)
            else:
                copy_part(part, tmp / part.name, model_root(model))
        (tmp / "model_index.json").write_text(derived_model_index(model), encoding="utf-8")
    check_pipeline_folder(folder)
    return folder


def resolve(ref: str, allow_pickle: bool = False, **fetch_options) -> Path:
    """The local folder of a model reference, with `+LORA[:SCALE]` parts fused into a cached folder.
    `fetch_options` go to models.references.fetch, for the model."""
    model_ref, specs = split_ref(ref)
    model = resolve_model(model_ref, allow_pickle=allow_pickle, **fetch_options)
    if not specs:
        return model
    return fused_folder(model, load_loras(specs, model, model_ref, allow_pickle))


def fetch_model(ref: str, revision: str | None = None, allow_pickle: bool = False, **fetch_options) -> Fetched:
    """What `dmm fetch` reports for a model reference: its local folder (with `+LORA[:SCALE]` parts fused into a
    cached one) and where it came from. `revision` applies to a Hub model named without `@rev`."""
    model, specs = split_ref(ref)
    if revision and "@" not in model and scheme_of(model) is None and not Path(model).exists():
        head, _, tail = model.partition("/")
        name, _, path = tail.partition("/")
        model = f"{head}/{name}@{revision}" + (f"/{path}" if path else "")
    if not specs:
        return fetch(model, allow_pickle=allow_pickle, **fetch_options)
    ref = model + "".join(f"+{spec}" for spec in specs)
    return Fetched(ref, str(resolve(ref, allow_pickle, **fetch_options)), "fused")
