"""Live Visdom dashboard for DNC runs: streaming (dashboard), the run's event log (eventlog),
replay of a run into Visdom (replay), the server (server) and its offline assets (assets)."""
