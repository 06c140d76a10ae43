"""The web UI server's routes: the login session and the proxy to the services."""
