"""Simulated users: existing judges the project did not write, personas, and rating noise."""
