
from .density import DensityCounter  # noqa: F401  (registers the DensityCounter meta-arch)
from .lc import ImageLevelCounter  # noqa: F401  (registers the ImageLevelCounter meta-arch)
from .ccgr import CCGRNet  # noqa: F401  (registers the CCGRNet meta-arch)
