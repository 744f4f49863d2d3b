"""The trial engine: one training step, one timer, one way of running a trial."""
