"""Train GANs that synthesise realistic medical images from DICOM data, the fastai way."""
__version__ = "0.0.1"

from .dicom import *
from .models import *
from .convert import *
from .data import *
from .style import *
from .augment import *
from .callbacks import *
from .learner import *
from .metrics import *
