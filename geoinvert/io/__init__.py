"""Input and output of results: the Dataset and its netCDF files, figures, saved models and
checkpoints (torch is imported only by the functions that need it)."""

from geoinvert.io.dataset import (acquire_lock, atomic_path, build_dataset, lock_path,
                                  marginal_direction, read_result, read_variable, release_lock,
                                  write_netcdf)
from geoinvert.io.figures import figures
from geoinvert.io.models import (checkpoint_meta, checkpoint_path, load_model, model_path,
                                 read_checkpoint, save_model, write_checkpoint)
from geoinvert.io.simulations import (SIMULATION_CHUNK, SimulationWriter, read_simulations,
                                      simulation_count, simulation_noise)

__all__ = ["build_dataset", "write_netcdf", "atomic_path", "read_result", "marginal_direction",
           "lock_path", "acquire_lock", "release_lock", "read_variable",
           "figures", "model_path", "checkpoint_path", "checkpoint_meta", "write_checkpoint",
           "read_checkpoint", "save_model", "load_model", "SimulationWriter", "read_simulations",
           "simulation_count", "simulation_noise", "SIMULATION_CHUNK"]
