"""Launching runs on clusters: ``dist-unlearn submit`` renders the sbatch templates of ``slurm/``
(a Ray cluster per job, or ``srun`` + ``torchrun``) and submits them with ``sbatch``; ``dist-unlearn init``
writes the example configs of ``configs/``. Both directories are package data (installed with the wheel)."""
