"""Cluster launcher behind `launch/slurm.py`: submitit executors (submit.py), the job each task
runs (job.py), following and cancelling jobs (manage.py), and the command line (cli.py)."""
