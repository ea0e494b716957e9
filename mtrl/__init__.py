"""mtrl: fine-grained reinforcement learning for machine translation."""

__version__ = "0.1.0"
