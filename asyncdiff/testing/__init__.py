"""Test fixtures that ship with the package (not part of the library's API).

* ``tiny``: tiny, offline diffusers pipelines with the real models' topology
  (random weights), built from the real configs in ``configs/``; the tests,
  the examples' offline mode and the benchmarks use them.
* ``ranks``: starts the rank processes of a local launch the way torchrun
  does, for tests and benchmarks.
"""
