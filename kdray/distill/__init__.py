"""Distillation: the pure loss functions and what a student needs of its teachers."""
