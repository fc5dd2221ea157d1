"""Recommender: model training, model versions, encrypted scoring and the catalogue."""
