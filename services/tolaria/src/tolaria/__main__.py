"""`python -m tolaria`: serve Tolaria (API and workers) with the settings from the environment."""

from esper.service import serve
from tolaria.main import create_app

if __name__ == "__main__":
    serve(create_app())
