"""Deployment helpers: `python -m deploy.compose` writes the compose files."""
