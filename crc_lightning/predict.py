"""``python -m crc_lightning.predict``: see :mod:`crc_lightning.apps.predict`."""

from crc_lightning.apps.predict import main

if __name__ == "__main__":
    main()
