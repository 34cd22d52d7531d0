"""``python -m asyncdiff.demo`` / ``torchrun --nproc_per_node=2 -m asyncdiff.demo``: see ``job.py``."""

from .job import main

main()
