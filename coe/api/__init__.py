"""OpenAI-compatible HTTP layer: schemas (``protocol``), errors (``errors``) and the FastAPI app (``server``).

Nothing below ``coe.api``/``coe.serve`` imports FastAPI: the engine and pool know nothing of HTTP.
"""
