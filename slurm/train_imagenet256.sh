#!/bin/bash
#SBATCH --job-name=sit-xl2-in256
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# SiT-XL/2 + REPA, ImageNet 256 (another preset: CONFIG=configs/class_cond/sit_b2_repa_in256.yaml ...).
#   sbatch [--nodes N] [--time ...] slurm/train_imagenet256.sh [key=value ...]     (from the repository root)
# Env: CONFIG, RUN_DIR, GPUS_PER_NODE, VENV/CONDA_ENV (slurm/common.sh). USR1 300 s before the time limit
# makes the trainer checkpoint (XL/ZeRO-3 on 8 H100: est. 5-60 s) and the job requeue itself.
exec "${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh" train class_cond/train.py \
    configs/class_cond/sit_xl2_repa_in256.yaml "$@"
