"""The nanochat web UI service: static chat + dashboard assets and a same-origin proxy to the APIs."""
