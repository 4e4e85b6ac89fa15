"""TrainingError: training or its held-out figures stopped (NaN loss, no held-out rows, a bad
store); the message says what to do. Defined here, below every module that raises it."""


class TrainingError(Exception):
    """Training stopped (NaN loss, bad store); the message says what to do."""
