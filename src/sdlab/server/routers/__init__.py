"""The HTTP routes, one module per resource (FastAPI's "bigger applications" layout)."""
