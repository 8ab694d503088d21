"""Who is calling: API keys, the identity they give a call, the checks on ratings, feedback rate limits."""
