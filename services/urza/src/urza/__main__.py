"""`python -m urza`: serve Urza with the settings from the environment."""

from esper.service import serve
from urza.main import create_app

if __name__ == "__main__":
    serve(create_app())
