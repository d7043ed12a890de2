"""The CLIP model behind CLIP score: a local folder or a Hub reference (`org/name[@revision]`), fetched pinned
and verified like models. By default the ViT-L/14 CLIP that text-to-image papers score with, when the Hub can be
reached or it is cached; otherwise CLIP score is skipped, with a note (metrics.json records the CLIP used)."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import console
from ..errors import BadInput, NetworkError
from ..files.text import read_json
from ..generate.samples import SampleSet

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
         "special_tokens_map.json", "preprocessor_config.json", "processor_config.json"]


def check_clip_folder(folder: Path, ref: str) -> Path:
    """Refuse a folder that is not a transformers CLIP model with safetensors weights, naming what is wrong."""
    config = folder / "config.json"
    try:
        model_type = read_json(config).get("model_type")
    except (OSError, ValueError, AttributeError):  # ValueError: bad JSON, or not UTF-8
        raise BadInput(f"--clip {ref}: not a CLIP model (no readable config.json)") from None
    if model_type != "clip":
        raise BadInput(f"--clip {ref}: not a CLIP model (its config.json says model_type {model_type!r})")
    if not (folder / "model.safetensors").is_file():
        raise BadInput(f"--clip {ref}: no model.safetensors (pickle weights are not loaded)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise BadInput(f"--clip {ref}: no tokenizer files")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise BadInput(f"--clip {ref}: no image processor config (preprocessor_config.json)")
    return folder


def resolve_clip(ref: str | None) -> Path | None:
    """The CLIP folder to score with, or None to skip CLIP score (`--clip none`, or no default within reach)."""
    from ..models.hub import fetch_files, offline
    from ..models.references import HUB_REF

    if ref is not None and ref.lower() == "none":
        return None
    given = ref is not None
    ref = ref or DEFAULT_CLIP
    local = Path(ref).expanduser()
    if given and local.is_dir():
        return check_clip_folder(local, ref)
    match = HUB_REF.match(ref)
    if match is None or match["path"] or ref.startswith((".", "/", "~")):
        raise BadInput(f"--clip {ref}: no such folder, and not a Hub reference (org/name[@revision])")
    try:
        folder = fetch_files(ref, match["repo"], match["rev"], lambda names: [n for n in FILES if n in names],
                             FILES, "no CLIP model files in the repo")
    except (NetworkError, BadInput) as e:  # BadInput: a Hub (or mirror) without the default repo
        if given:
            raise
        if offline():
            console.say(f"eval: CLIP score skipped (the default CLIP {DEFAULT_CLIP} is not cached and HF_HUB_OFFLINE "
                        "is set; give --clip a local folder)")
        else:
            console.warn(f"eval: CLIP score skipped: {e}")
        return None
    return check_clip_folder(folder, ref)


@torch.inference_mode()
def clip_score(sets: list[SampleSet], clip: Path, batch_size: int = 32) -> float:
    """CLIP score as defined by Hessel et al. (torchmetrics' definition): 100 · max(cos(image, prompt), 0), averaged
    over every picture. Computed with transformers directly: torchmetrics' CLIPScore breaks on transformers 5."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip).eval()
    processor = CLIPProcessor.from_pretrained(clip)
    max_length = model.config.text_config.max_position_embeddings
    pairs = [(image, prompt) for samples in sets for image, prompt in zip(samples.images(), samples.prompts)]
    scores = []
    for start in range(0, len(pairs), batch_size):
        images, prompts = zip(*pairs[start:start + batch_size])
        inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                           truncation=True, max_length=max_length)
        out = model(**inputs)
        image, text = (torch.nn.functional.normalize(e.float(), dim=-1) for e in (out.image_embeds, out.text_embeds))
        scores.append(100 * (image * text).sum(-1).clamp(min=0))
    return float(torch.cat(scores).mean())
