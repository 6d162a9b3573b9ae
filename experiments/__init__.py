"""The research harness beside the library, installed as ``noether_experiments``.

``protocol`` (the evaluation protocol of EVALUATION.md: per-sequence errors, nested bootstrap,
the selection rule, provenance, the JSON schema), ``rederive`` (every docs table regenerated
from its JSON) and the full experiments, each a script with ``--quick`` for the tests:
``pendulum`` and ``spring`` (on ``hamiltonian``), ``real_pendulum`` and ``real_blocks``,
``ising``, ``video`` and ``newcomer``. Run one as ``python experiments/pendulum.py`` or
``python -m noether_experiments.pendulum``. The short scripts a user reads first are in
``examples/``.
"""
