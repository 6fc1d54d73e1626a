"""``python -m crc_lightning.preprocess``: see :mod:`crc_lightning.apps.preprocess`."""

from crc_lightning.apps.preprocess import main

if __name__ == "__main__":
    main()
