"""The one exception type a user of napari-sparseseg is meant to read."""


class SparseSegError(ValueError):
    """Bad input or an unusable model: the message names the input and what was expected.

    The command line prints the message without a traceback; the napari widgets show it as a
    notification.
    """
