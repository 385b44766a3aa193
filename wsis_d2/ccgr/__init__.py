"""
CCGR (center-context-gap refinement, AAAI 2020): instance segmentation from image-level labels.
Importing the package registers ``CCGRNet`` (META_ARCH), ``WSDDNROIHeads`` (ROI_HEADS),
``PSPHead`` (SEM_SEG_HEADS) and ``CCGRDatasetMapper``; CCGRNet's other components
(``BagBuilder``, ``ContextGapRefiner``, ``PseudoLabeller``, ``WSDDNOutputLayers``) are built by
their own ``from_config``; :class:`CCGRRounds` drives the rounds.
"""

from .bags import BagBuilder
from .config import add_ccgr_config
from .mapper import CCGRDatasetMapper
from .meta_arch import CCGRNet
from .psp_head import PSPHead
from .pseudo_labeller import PseudoLabeller
from .refiner import ContextGapRefiner
from .wsddn_head import WSDDNOutputLayers, WSDDNROIHeads
from .rounds import CCGRRounds

__all__ = [
    "BagBuilder",
    "CCGRDatasetMapper",
    "CCGRNet",
    "CCGRRounds",
    "ContextGapRefiner",
    "PSPHead",
    "PseudoLabeller",
    "WSDDNOutputLayers",
    "WSDDNROIHeads",
    "add_ccgr_config",
]
