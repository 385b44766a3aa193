from .lc_heads import LC_HEAD_REGISTRY, LCHead, build_lc_head  # noqa: F401  (registers LCHead)
from .psp_head import PSPHead  # noqa: F401  (registers PSPHead in SEM_SEG_HEADS_REGISTRY)
