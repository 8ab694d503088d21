"""Reward models: a learned preference model, classifier rewards, and weighted combinations."""
