"""The hub's HTTP API, one router per resource; ``petah.fleet.hub_app.create_hub_app`` puts them together."""
