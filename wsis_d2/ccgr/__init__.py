"""
CCGR (center-context-gap refinement, AAAI 2020): instance segmentation from image-level labels.
Importing the package registers ``CCGRNet`` (META_ARCH), ``WSDDNROIHeads`` (ROI_HEADS),
``PSPHead`` (SEM_SEG_HEADS) and ``CCGRDatasetMapper``; :class:`CCGRRounds` drives the rounds.
"""
from .config import add_ccgr_config
from .mapper import CCGRDatasetMapper
from .meta_arch import CCGRNet
from .psp_head import PSPHead
from .wsddn_head import WSDDNOutputLayers, WSDDNROIHeads
from .rounds import CCGRRounds

__all__ = [
    "CCGRDatasetMapper",
    "CCGRNet",
    "CCGRRounds",
    "PSPHead",
    "WSDDNOutputLayers",
    "WSDDNROIHeads",
    "add_ccgr_config",
]
