"""Reference MCMC samplers (pCN, MALA, HMC) run as batches of chains; no dolfinx import."""

from geoinvert.samplers.chains import ChainResult, DualAveraging, RobbinsMonro
from geoinvert.samplers.hmc import hmc
from geoinvert.samplers.mala import mala
from geoinvert.samplers.pcn import pcn
from geoinvert.samplers.whitening import Whitening, prior_whitening

__all__ = ["ChainResult", "DualAveraging", "RobbinsMonro", "Whitening", "hmc", "mala", "pcn",
           "prior_whitening"]
