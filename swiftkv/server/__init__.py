"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared engine loop."""
