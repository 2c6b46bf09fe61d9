"""Stage 8, the public Python API (`import mlsae`): each pipeline stage as one call with the
CLI's names (`pipeline`), a run as an object (`Run`), and the per-prompt helpers a notebook
needs (`prompt`). It adds no math of its own: every call is the function the CLI command or
the explorer runs. May import: every stage below it (core ... report, explore); cli imports it.
"""
