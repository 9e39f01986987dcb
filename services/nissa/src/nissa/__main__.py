"""`python -m nissa`: serve Nissa with the settings from the environment."""

from esper.service import serve
from nissa.main import create_app

if __name__ == "__main__":
    serve(create_app())
