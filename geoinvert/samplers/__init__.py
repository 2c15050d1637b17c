"""Reference MCMC samplers (pCN, MALA, HMC) run as batches of chains, tempered SMC and Laplace
mixtures; no dolfinx import."""

from geoinvert.samplers.chains import ChainResult, DualAveraging, RobbinsMonro
from geoinvert.samplers.hmc import run_hmc
from geoinvert.samplers.laplace import LaplaceResult, Mode, find_modes, laplace_mixture
from geoinvert.samplers.mala import run_mala
from geoinvert.samplers.pcn import run_pcn
from geoinvert.samplers.smc import SMCResult, tempered_smc
from geoinvert.samplers.whitening import Whitening, prior_whitening

__all__ = ["ChainResult", "DualAveraging", "RobbinsMonro", "Whitening", "prior_whitening",
           "run_hmc", "run_mala", "run_pcn", "SMCResult", "tempered_smc", "LaplaceResult", "Mode",
           "find_modes", "laplace_mixture"]
