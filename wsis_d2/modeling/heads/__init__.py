
from .lc_heads import LC_HEAD_REGISTRY, LCHead, build_lc_head  # noqa: F401  (registers LCHead)
