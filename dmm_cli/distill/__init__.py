"""Multi-teacher distillation into one style-promptable student (paper §3.3-3.4)."""
from .plan import RunPlan, plan_run, plan_text
from .run import Interrupted, lost_process_behind, run

__all__ = ["Interrupted", "RunPlan", "lost_process_behind", "plan_run", "plan_text", "run"]
