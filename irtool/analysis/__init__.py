"""Analyses: cached, read-only facts about a model (shapes, cost, ...)."""
