"""`sdlab serve`: the AUTOMATIC1111-compatible HTTP API (/sdapi/v1), a job queue, and a web page.

    from sdlab.server.app import create_app
    from sdlab.server.settings import ServerSettings
    app = create_app(ServerSettings(models_dir=Path("models")))

Needs the `serve` extra (fastapi, uvicorn); nothing here is imported by `import sdlab`.
"""
