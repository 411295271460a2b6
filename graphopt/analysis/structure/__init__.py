"""Structure analyses: which tensors are coupled and must be pruned together.

* :mod:`~graphopt.analysis.structure.transformer`: attention blocks (Q/K/V/O projections,
  head counts, grouped KV heads) and FFN blocks (up/gate/down) of transformer graphs.
"""

from __future__ import annotations
