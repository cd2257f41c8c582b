"""Write a new Alembic revision from the difference between the models and the migrations.

Usage: python tools/new_migration.py "what changes"
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from imagebridge.db import make_engine
from imagebridge.migrate import alembic_config, upgrade


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as folder:
        engine = make_engine(f"sqlite:///{Path(folder) / 'head.db'}")
        upgrade(engine)
        config = alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.revision(config, message=sys.argv[1], autogenerate=True)


if __name__ == "__main__":
    main()
