"""Releases to many stations: TUF metadata (``metadata``), the hub (``hub``, state in ``registry``;
its HTTP API in ``hub_app`` and ``routers``), publishing (``client``), and the station's update
agent (``agent``, ``gate``); device ids (``ids``).

Imports are per module: the agent side needs neither the hub's FastAPI app nor SQLite.
"""
