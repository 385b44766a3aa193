from .wsddn import WSDDNROIHeads  # noqa: F401  (registers WSDDNROIHeads in ROI_HEADS_REGISTRY)
