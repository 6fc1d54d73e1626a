"""``python -m crc_lightning.report``: see :mod:`crc_lightning.apps.report`."""

from crc_lightning.apps.report import main

if __name__ == "__main__":
    main()
