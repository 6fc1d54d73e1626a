"""``python -m crc_lightning.run``: see :mod:`crc_lightning.apps.run`."""

from crc_lightning.apps.run import main

if __name__ == "__main__":
    main()
