"""Train GANs that synthesise realistic medical images from DICOM data, the fastai way."""
__version__ = "0.0.1"

from .dicom import *
