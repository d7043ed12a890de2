"""Multi-teacher distillation into one style-promptable student (paper §3.3-3.4)."""
from .run import Interrupted, RunPlan, plan_run, run

__all__ = ["Interrupted", "RunPlan", "plan_run", "run"]
