#!/bin/bash
# Example SLURM job: one geoinvert case on 2 nodes x 32 ranks, resubmittable.
#
#   sbatch examples/slurm_job.sh cases/elliptic_bimodal.yaml
#
# - Each rank trains on its block of every batch (ensemble parallelism); rank 0 writes the
#   result, the model and the checkpoints beside --out (a shared filesystem is assumed).
# - SLURM sends SIGTERM at the time limit (--signal asks for it 5 minutes early): geoinvert
#   finishes the current step, saves a checkpoint and exits with status 143. `--requeue`
#   plus `--resume` below make the job continue where it stopped when it runs again; without a
#   checkpoint, --resume simply starts from the beginning.
# - For meshes too large for one core, give each solve several ranks: --ranks-per-solve 4
#   (the ranks must be a multiple of it; use solver: lu or cg in the case file).
#SBATCH --job-name=geoinvert
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=32
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=geoinvert-%j.log

set -euo pipefail
CASE=${1:?usage: sbatch examples/slurm_job.sh CASE.yaml [OUT.nc]}
OUT=${2:-results/$(basename "${CASE%.*}").nc}

# Site-specific: load the MPI and Python environment geoinvert was installed into, e.g.
# module load openmpi && source /path/to/geoinvert/.venv/bin/activate
export OMP_NUM_THREADS=1          # one thread per rank: the ranks already fill the cores

# srun forwards SLURM's SIGTERM to every rank; all ranks agree to stop at the same step.
srun geoinvert run "$CASE" --out "$OUT" --resume --checkpoint-every 20
