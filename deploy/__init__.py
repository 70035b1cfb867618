"""Ways to deploy the service beyond one ``uvicorn main:app``: see ``deploy/ray_serve.py``."""
