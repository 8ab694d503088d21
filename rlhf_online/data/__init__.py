"""Data shipped with the package: the demo's prompt set."""
