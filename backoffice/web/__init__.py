"""The back office's API and web pages (FastAPI, Jinja2 templates); ``create_app`` in backoffice.web.app."""
