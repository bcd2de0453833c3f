"""Serving: the Ray Serve NLU endpoint (``app``), its typed HTTP API (``api``) and A/B bookkeeping (``ab``).

Importing this package starts nothing; ``atm_ray.serve.app`` imports Ray Serve.
"""
