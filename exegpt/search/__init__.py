"""The search: the branch and bound over integer boxes (``bnb``), the outer loops over every registered policy's
layouts that pick a plan under an SLO (``optimize``), and the search on the simulated engine for the SLO forms the
estimate cannot check (``goodput``)."""

from .bnb import SearchResult, Space, branch_and_bound, exhaustive

__all__ = ["SearchResult", "Space", "branch_and_bound", "exhaustive"]
