"""Errors raised on bad input. All are ``ValueError`` subclasses with one-line messages."""


class ExeGPTError(ValueError):
    """Bad input to the library: the message names the bad value and what was expected."""


class ProfileRangeError(ExeGPTError):
    """A profile lookup fell outside the measured range of a table that does not allow extrapolation."""


class InfeasibleBoundError(ExeGPTError):
    """No schedule in the search space meets the latency bound.

    ``smallest_feasible_s`` is the smallest bound that some schedule of the same space meets
    (``inf`` when even memory rules every schedule out).
    """

    def __init__(self, message: str, smallest_feasible_s: float):
        super().__init__(message)
        self.smallest_feasible_s = smallest_feasible_s
