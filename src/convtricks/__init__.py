"""convtricks: the lecture's tricks for small-data image classification, one switch each."""

__version__ = "0.1.0"
