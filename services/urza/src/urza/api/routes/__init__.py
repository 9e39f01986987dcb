"""Urza's routers, one module per resource."""
