"""Recommender models behind one interface, and the registry that builds them by name."""

from kdray.models.base import (  # noqa: F401
    MODELS,
    LightGCN,
    MF,
    NeuMF,
    RecModel,
    TwoTower,
    build_model,
    count_parameters,
    embedding_tables,
    model_args,
)
