"""Tamiyo's routers, one module per resource."""
