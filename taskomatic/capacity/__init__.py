"""Capacity planning: the queueing model (``queueing``), the search (``model``), planning from a fleet's
history (``fleet``) and the ``taskomatic plan`` / ``taskomatic bench`` commands (``cli``)."""
