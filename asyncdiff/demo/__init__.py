"""The main job and the small trained model it runs (not part of the library).

``torchrun --nproc_per_node=2 -m asyncdiff.demo`` (``job.py``) samples the
digits 0..9 with the model in ``weights/`` (``digits.py``), sequentially and
with AsyncDiff, and compares the two.
"""
