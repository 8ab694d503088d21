"""Data shipped with the package (the demo's prompt set) and the held-out split of logged prompts."""
