"""Weight-space merges, the baselines DMM must beat: one registered function per method, streamed tensor by tensor."""
from . import dare, linear, ties  # noqa: F401  (each registers its methods)
from .dare import dare_mask
from .registry import METHODS, MergeParams
from .run import baseline_merge

__all__ = ["METHODS", "MergeParams", "baseline_merge", "dare_mask"]
