"""What a model predicts and on which noise schedule it was trained, read from its scheduler config.

Teachers and the student must share the training noise schedule (the ᾱ_t each timestep means); what
they predict (ε, v or x₀) may differ, since any of the three converts exactly into the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .folders import read_config

# scheduler_config.json entries that fix ᾱ_t; sampling settings (timestep spacing, solver) do not matter here
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "rescale_betas_zero_snr")
DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "trained_betas": None, "rescale_betas_zero_snr": False}


@dataclass(frozen=True)
class Schedule:
    prediction_type: str
    training: tuple  # the SCHEDULE_KEYS values, in order

    @property
    def num_train_timesteps(self) -> int:
        return self.training[SCHEDULE_KEYS.index("num_train_timesteps")]

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in zip(SCHEDULE_KEYS, self.training) if v not in (None, False))


def read_schedule(folder: Path) -> Schedule:
    """The schedule of a checked model folder (`check_pipeline_folder` has refused an unknown prediction type)."""
    config = read_config(Path(folder) / "scheduler" / "scheduler_config.json")
    return Schedule(config.get("prediction_type", "epsilon"), tuple(config.get(k, DEFAULTS[k]) for k in SCHEDULE_KEYS))
