"""The text side of distillation: captions tokenized by every tokenizer of the model family, encoded the way
its pipeline encodes them, and cached per distinct caption.

SD1.x/2.x condition on the text encoder's last hidden states. SDXL conditions on both encoders' penultimate
hidden states side by side, plus the second encoder's pooled projection (fed with the size conditioning to
the text-time embedding), and drops a caption by zeroing all of it, as SDXL was trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import ModelError
from ..files.hashing import component_sha256
from ..files.text import read_json
from ..models.folders import model_family
from ..models.pipeline import load_component

XL_TEXT_PARTS = (("text_encoder", "tokenizer", CLIPTextModel),
                 ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
TEXT_PARTS = XL_TEXT_PARTS[:1]


def text_parts(folder: Path) -> tuple:
    """(encoder folder, tokenizer folder, encoder class) of each text encoder of a model folder, in order."""
    return XL_TEXT_PARTS if model_family(folder) == "SDXL" else TEXT_PARTS


@dataclass
class Conditioning:
    """What a UNet reads from a caption: the cross-attention context, and SDXL's pooled embedding."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def __getitem__(self, rows) -> "Conditioning":
        return Conditioning(self.context[rows], None if self.pooled is None else self.pooled[rows])

    def to(self, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(self.context.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    def clone(self) -> "Conditioning":  # an ordinary tensor copy of what inference mode produced
        return Conditioning(self.context.clone(), None if self.pooled is None else self.pooled.clone())

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning(self.context.repeat(n, 1, 1), None if self.pooled is None else self.pooled.repeat(n, 1))

    def unet_kwargs(self, time_ids: torch.Tensor | None) -> dict:
        """Keyword arguments of a diffusers UNet call; SDXL's also carry the size conditioning `time_ids`."""
        if self.pooled is None:
            return {"encoder_hidden_states": self.context}
        return {"encoder_hidden_states": self.context,
                "added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": time_ids.to(self.pooled.dtype)}}


class TextEncoders:
    """One model's text encoders, run as its pipeline runs them."""

    def __init__(self, encoders: list, zero_empty: bool):
        self.encoders, self.zero_empty = encoders, zero_empty
        self.xl = len(encoders) > 1

    @property
    def bytes_per_token(self) -> int:
        return sum(e.config.hidden_size for e in self.encoders) * 2

    def __call__(self, ids: torch.Tensor) -> Conditioning:
        """Conditioning of token ids shaped (batch, tokenizers, tokens)."""
        device = next(self.encoders[0].parameters()).device
        with torch.inference_mode():
            if not self.xl:
                return Conditioning(self.encoders[0](ids[:, 0].to(device))[0])
            hidden, pooled = [], None
            for encoder, part in zip(self.encoders, ids.unbind(1)):
                out = encoder(part.to(device), output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # the projection of the last encoder
            return Conditioning(torch.cat(hidden, -1), pooled)


def load_tokenizers(folder: Path) -> list[CLIPTokenizer]:
    return [CLIPTokenizer.from_pretrained(Path(folder) / tokenizer) for _, tokenizer, _ in text_parts(folder)]


def tokenize(tokenizers: list[CLIPTokenizer], texts: list[str]) -> torch.Tensor:
    """Token ids of `texts`, shaped (texts, tokenizers, tokens)."""
    lengths = {t.model_max_length for t in tokenizers}
    if len(lengths) > 1:
        raise ModelError(f"the text encoders' tokenizers take different lengths ({sorted(lengths)}), which dmm "
                         "does not train on")
    return torch.stack([t(texts, padding="max_length", max_length=t.model_max_length, truncation=True,
                          return_tensors="pt").input_ids for t in tokenizers], 1)


def _zero_empty(folder: Path) -> bool:
    """Whether the pipeline conditions on zeros for an empty prompt (SDXL's force_zeros_for_empty_prompt)."""
    if model_family(folder) != "SDXL":
        return False
    return read_json(Path(folder) / "model_index.json").get("force_zeros_for_empty_prompt", True)


def load_text_encoders(folders: dict[str, Path], device, dtype) -> tuple[dict[str, str], dict[str, TextEncoders]]:
    """Text encoders by content hash: identical ones (the usual case for fine-tunes) are loaded once."""
    key_of, encoders = {}, {}
    for name, folder in folders.items():
        parts = text_parts(folder)
        key = ":".join(component_sha256(folder / part) for part, _, _ in parts)
        key_of[name] = key
        if key not in encoders:
            loaded = [load_component(cls, folder, part, dtype).to(device).eval().requires_grad_(False)
                      for part, _, cls in parts]
            encoders[key] = TextEncoders(loaded, _zero_empty(folder))
    return key_of, encoders


class TextContexts:
    """Text-encoder outputs per caption. Cached on the device for every distinct caption when that fits."""

    def __init__(self, encoders: dict[str, TextEncoders], caption_ids: torch.Tensor, empty_ids: torch.Tensor,
                 device: torch.device, budget_bytes: int = 1 << 30):
        self.encoders = encoders
        unique, index = torch.unique(torch.cat([caption_ids, empty_ids[None]]), dim=0, return_inverse=True)
        self.caption_rows, self.empty_row = index[:-1], int(index[-1])
        self.caption_ids, self.empty_ids = caption_ids, empty_ids
        size = len(unique) * caption_ids.shape[-1] * sum(e.bytes_per_token for e in encoders.values())
        self.cache = None
        if size <= budget_bytes:
            self.cache, self.drop_row = {}, {}
            for key, encoder in encoders.items():
                parts = [encoder(chunk) for chunk in unique.split(256)]
                if encoder.zero_empty:  # a zeroed row after the captions' (an empty caption keeps its encoding)
                    parts.append(_zeroed(parts[0][:1], torch.ones(1, dtype=torch.bool)))
                self.cache[key] = Conditioning(torch.cat([p.context for p in parts]),
                                               torch.cat([p.pooled for p in parts]) if encoder.xl else None)
                self.drop_row[key] = len(unique) if encoder.zero_empty else self.empty_row
            self.caption_rows = self.caption_rows.to(device)

    def __call__(self, idx: torch.Tensor, drop: torch.Tensor) -> dict[str, Conditioning]:
        """Conditioning for dataset items `idx` (caption dropped where `drop`), one per set of text encoders."""
        if self.cache is not None:
            return {key: cached[torch.where(drop, self.drop_row[key], self.caption_rows[idx])]
                    for key, cached in self.cache.items()}
        ids = torch.where(drop[:, None, None].cpu(), self.empty_ids, self.caption_ids[idx.cpu()])
        found = {}
        for key, encoder in self.encoders.items():
            found[key] = encoder(ids)
            if encoder.zero_empty:
                found[key] = _zeroed(found[key], drop)
        return found


def _zeroed(cond: Conditioning, rows: torch.Tensor) -> Conditioning:
    keep = (~rows).to(cond.context.device, cond.context.dtype)
    pooled = None if cond.pooled is None else cond.pooled * keep[:, None]
    return Conditioning(cond.context * keep[:, None, None], pooled)
