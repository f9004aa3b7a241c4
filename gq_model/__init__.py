"""GQ model core: the Gaussian codebook, the training-free quantizer, the TDC regularizer and the autoencoders."""
from gq_model.codebook import codebook_fingerprint, gaussian_codebook
from gq_model.config import GQConfig
from gq_model.model import GQModel
from gq_model.quantizer import GaussianQuantizer
from gq_model.tdc import TDCRegularizer

__all__ = ["gaussian_codebook", "codebook_fingerprint", "GaussianQuantizer", "TDCRegularizer", "GQModel", "GQConfig"]
__version__ = "0.1.0"
