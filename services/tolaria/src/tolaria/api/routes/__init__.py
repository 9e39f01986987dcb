"""Tolaria's routers, one module per resource."""
