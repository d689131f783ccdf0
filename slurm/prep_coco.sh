#!/bin/bash
#SBATCH --job-name=prep-coco
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# MS-COCO -> text-to-image shards as a job (data_prep/coco.py; arguments passed through), one accelerate
# launcher per node starting one process per GPU. Rerunning resumes.
#   sbatch slurm/prep_coco.sh --images /data/coco/train2014 \
#       --captions /data/coco/annotations/captions_train2014.json --out /data/coco256/train --resolution 256
exec "${REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh" accelerate data_prep.coco "$@"
