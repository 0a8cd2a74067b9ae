"""`ayar serve`: an OpenAI-compatible server for a run directory or model (`create_app(settings)`)."""
