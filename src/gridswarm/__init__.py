"""gridswarm: train language models on a swarm of independent machines, where energy is clean."""

__version__ = "0.1.0"
