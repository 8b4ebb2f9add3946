"""kdray: knowledge distillation for recommender systems, distributed on Ray."""

__version__ = "0.1.0"
