#!/bin/bash
#SBATCH --job-name=eval-fid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=6:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Generation + FID of a run as a job (eval/evaluate.py; the first argument is --run), one accelerate launcher per
# node starting one process per GPU. Rerunning resumes.
#   sbatch slurm/eval_fid.sh runs/coco --sampler ode --steps 50 --cfg 2.0 --cond-file ... --ref ...
exec "${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh" accelerate eval.evaluate --run "$@"
