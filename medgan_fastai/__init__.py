"""Train GANs that synthesise realistic medical images from DICOM data, the fastai way."""
__version__ = "0.0.1"

import warnings as _warnings
# fastai's layers module triggers torch's own deprecation notice for `torch.jit.script` on every import: noise for our users
_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)

from .dicom import *
from .series import *
from .models import *
from .convert import *
from .slices import *
from .data import *
from .style import *
from .augment import *
from .callbacks import *
from .learner import *
from .distributed import *
from .metrics import *
from .scoring import *
from .latent import *
