from .lc_losses import (  # noqa: F401
    estimate_counts,
    hard_spatial_guidance,
    lc_class_loss,
    lc_count_loss,
    lc_ranking_loss,
    lc_spatial_loss,
)
from .wsddn_losses import wsddn_bag_scores, wsddn_loss  # noqa: F401
