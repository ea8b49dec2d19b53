"""The station's HTTP API, one router per resource; ``petah.serve.app.create_app`` puts them together."""
