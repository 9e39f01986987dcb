"""`python -m tamiyo`: serve Tamiyo with the settings from the environment."""

from esper.service import serve
from tamiyo.main import create_app

if __name__ == "__main__":
    serve(create_app())
