"""deltatune: adapt one frozen pretrained transformer to many tasks with small deltas."""

__version__ = "0.1.0"
