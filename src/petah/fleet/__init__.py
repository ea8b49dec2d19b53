"""Releases to many stations: TUF metadata (``metadata``), the hub (``hub``, state in
``registry``), publishing (``client``), and the station's update agent (``agent``, ``gate``).

Imports are per module: the agent side needs neither the hub's FastAPI app nor SQLite.
"""
